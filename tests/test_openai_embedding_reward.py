"""`reward.backend: openai`: the reward with embeddings from an OpenAI-compatible server.

Against a real server (infinity-emb serving the bundled MiniLM on loopback, tests/embedding_server_helpers.py):
rewards = the in-process MiniLM's, references cached, a killed server retried then named, a wrong key
refused, and through the CLI a run whose server dies after step 1 stops before training step 2.
The client's own behaviour on answers a real server does not give at will (5xx then success, a
timeout, malformed JSON) is checked against a small stdlib HTTP server written here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from cli_runner import REPO, cli
from embedding_server_helpers import MODEL_NAME, EmbeddingServer
from nemo_rlsr.config import ConfigError, RewardConfig
from nemo_rlsr.config.rules import reward_problems
from nemo_rlsr.rewards import EmbeddingSimilarityReward, build_reward_actor
from nemo_rlsr.rewards.endpoint import EndpointEncoder, EndpointError

KEY_ENV = "NEMO_RLSR_TEST_EMBED_KEY"
KEY = "sk-test-4f9c1e7a0b2d"  # a value that must never show up in a message or a log
REFERENCE = "A dog is a loyal animal that barks and likes to play fetch."
REFERENCE_2 = "The sun is a star at the centre of the solar system."
PARAPHRASE = "Dogs are faithful pets; they bark and enjoy fetching balls."
UNRELATED = "The stock market fell sharply on Tuesday after interest rates rose."
LOOPING = "I will keep saying this again." * 10  # repetition-penalised
LONG = " ".join(f"Dog {i} barks at {7 * i} cats." for i in range(120))  # > 256 tokens, no long repeat
RESPONSES = [PARAPHRASE, UNRELATED, LOOPING, LONG, "", "The sun shines.", "Stars burn hydrogen."]
REFERENCES = [REFERENCE] * 5 + [REFERENCE_2] * 2


def openai_config(url: str, **keys) -> RewardConfig:
    return RewardConfig(backend="openai", endpoint_url=url, endpoint_model=MODEL_NAME,
                        endpoint_api_key_env=KEY_ENV, **keys)


# ---- the real server (a process: these tests are `slow`) ------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = EmbeddingServer(tmp_path_factory.mktemp("embed") / "server.log", api_key=KEY)
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def in_process() -> EmbeddingSimilarityReward:
    reward = EmbeddingSimilarityReward()
    yield reward
    reward.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.mark.slow  # starts the server
def test_rewards_equal_in_process_minilm(server, in_process, key_env):
    remote = build_reward_actor(openai_config(server.url, batch_size=3, endpoint_chars_per_batch=4000), "cpu")
    try:
        prompts = ["p"] * len(RESPONSES)
        got = remote.score(prompts, RESPONSES, REFERENCES)
        want = in_process.score(prompts, RESPONSES, REFERENCES)
        assert remote.encoder.requests > 2  # several batches: the budgets split the texts
        assert got.penalized.tolist() == want.penalized.tolist() == [False, False, True, False, False, False, False]
        assert torch.allclose(got.rewards, want.rewards, atol=1e-5, rtol=0), (got.rewards, want.rewards)
        assert torch.allclose(got.cosine, want.cosine, atol=1e-5, rtol=0)
        assert got.rewards[2].item() == -1.0 and got.cosine[0] > got.cosine[1] + 0.3
        assert torch.allclose(remote.embed(RESPONSES), in_process.embed(RESPONSES), atol=1e-5, rtol=0)
        assert in_process.encoder.encode([LONG]).cut.item()  # LONG is past MiniLM's window: the server cut it alike
    finally:
        remote.close()


@pytest.mark.slow  # starts the server
def test_references_embedded_once(server, key_env):
    remote = build_reward_actor(openai_config(server.url), "cpu")  # one request per call's texts
    try:
        first = remote.score(["p", "p"], [PARAPHRASE, UNRELATED], [REFERENCE, REFERENCE])
        assert remote.encoder.requests == 2  # the responses, then the one distinct reference
        again = remote.score(["p", "p"], [PARAPHRASE, UNRELATED], [REFERENCE, REFERENCE])
        assert remote.encoder.requests == 3  # the responses only: the reference came from the cache
        assert torch.equal(first.rewards, again.rewards)
    finally:
        remote.close()


@pytest.mark.slow  # starts the server
def test_wrong_key_refused_at_once_without_echo(server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, "wrong-" + KEY)
    remote = build_reward_actor(openai_config(server.url, endpoint_retries=3, endpoint_backoff_s=5.0), "cpu")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(EndpointError) as err:
        remote.score(["p"], [PARAPHRASE], [REFERENCE])
    assert time.monotonic() - start < 5.0  # not retried: a 4xx is not transient
    assert server.url in str(err.value) and "401" in str(err.value)
    assert KEY not in str(err.value) + caplog.text + repr(remote.encoder)
    remote.close()


@pytest.mark.slow  # starts the server
def test_killed_server_retried_then_named(tmp_path, key_env, caplog):
    srv = EmbeddingServer(tmp_path / "server.log", api_key=KEY)
    remote = build_reward_actor(openai_config(srv.url, endpoint_retries=2, endpoint_backoff_s=0.1), "cpu")
    try:
        assert len(remote.score(["p"], [PARAPHRASE], [REFERENCE])) == 1
        srv.kill()
        with caplog.at_level(logging.WARNING), pytest.raises(EndpointError) as err:
            remote.score(["p", "p"], [PARAPHRASE, UNRELATED], [REFERENCE, REFERENCE])
        assert f"{srv.url}/embeddings failed after 3 attempts" in str(err.value)
        assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
        assert KEY not in str(err.value) + caplog.text
    finally:
        srv.kill()
        remote.close()


KILLER = '''
import os, signal

def score(prompt, response, reference, step):
    """A weight-0 term that kills the embeddings server once step 1 is scored."""
    if step == 1:
        try:
            os.killpg(int(os.environ["EMBED_SERVER_PID"]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 0.0
'''


@pytest.mark.slow
def test_cli_stops_before_training_when_the_server_dies(tmp_path, monkeypatch):
    """2 steps, the server SIGKILLed right after step 1's rewards (by a weight-0 function term): step 1
    trains and checkpoints, step 2's reward call retries and fails naming the URL, nothing of step 2
    is trained, logged or saved."""
    srv = EmbeddingServer(tmp_path / "server.log", api_key=KEY)
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("EMBED_SERVER_PID", str(srv.proc.pid))
    (tmp_path / "killer.py").write_text(KILLER)
    out = tmp_path / "run"
    args = ["pretrain.steps=10", "grpo.prompts_per_step=4", "grpo.num_generations=4", "grpo.micro_batch_size=8",
            "rollout.max_new_tokens=12", "trainer.progress_bar=false", "trainer.steps=2", "trainer.heldout_eval=false",
            "trainer.checkpoint_every=1", f"trainer.output_dir={out}", "reward.backend=openai",
            f"reward.endpoint_url={srv.url}", f"reward.endpoint_model={MODEL_NAME}",
            f"reward.endpoint_api_key_env={KEY_ENV}", "reward.endpoint_retries=2", "reward.endpoint_backoff_s=0.2",
            "reward.terms=[{kind: cosine}, {kind: repetition, replace: true}, "
            f"{{kind: function, name: killer, function: '{tmp_path / 'killer.py'}:score', weight: 0}}]"]
    try:
        output = cli("train", "rlsr_tiny.yaml", args, timeout=600, expect=1)
    finally:
        srv.kill()
    assert f"embedding endpoint {srv.url}/embeddings failed after 3 attempts" in output, output[-3000:]
    assert output.count("retry") >= 2 and KEY not in output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert records[0]["reward/encoder_truncated"] == 0.0
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved == ["step_0000001"]


# ---- the client against a scripted loopback server -------------------------------------------------


class ScriptedServer:
    """Answers POST /v1/embeddings with `script[i]` for the i-th request (the last one repeats):
    a callable (inputs, headers) -> (status, body bytes, delay in s). Records each request."""

    def __init__(self, script) -> None:
        self.script, self.requests = list(script), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                inputs = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["input"]
                owner.requests.append((self.path, inputs, dict(self.headers)))
                step = owner.script[min(len(owner.requests), len(owner.script)) - 1]
                status, body, delay = step(inputs, self.headers)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def vector(text: str) -> list[float]:
    """A 4-d embedding that identifies its text (length, first char), not unit norm on purpose."""
    return [float(len(text)) + 1.0, float(ord(text[0])) if text else 0.0, 1.0, 2.0]


def answer(inputs, headers, shuffle: bool = True):
    data = [{"object": "embedding", "index": i, "embedding": vector(t)} for i, t in enumerate(inputs)]
    return 200, json.dumps({"object": "list", "data": data[::-1] if shuffle else data}).encode(), 0.0


def fails(status: int, body: bytes = b'{"error": "busy"}', delay: float = 0.0):
    return lambda inputs, headers: (status, body, delay)


@pytest.fixture
def scripted():
    servers = []

    def start(*script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def expected(texts) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor([vector(t) for t in texts]), dim=-1)


def test_5xx_then_success_is_retried(scripted, caplog):
    srv = scripted(fails(503), fails(502), answer)
    encoder = EndpointEncoder(srv.url, "m", retries=2, backoff_s=0.01)
    with caplog.at_level(logging.WARNING):
        got = encoder.encode(["ab", "c"]).embeddings
    assert len(srv.requests) == 3 and srv.requests[0][0] == "/v1/embeddings"
    assert torch.allclose(got, expected(["ab", "c"]))  # rows in input order though the answer was reversed
    assert len([r for r in caplog.records if "HTTP 503" in r.getMessage()]) == 1


def test_retries_exhausted_names_the_url(scripted):
    srv = scripted(fails(500))
    with pytest.raises(EndpointError, match=f"{srv.url}/embeddings failed after 2 attempts: HTTP 500"):
        EndpointEncoder(srv.url, "m", retries=1, backoff_s=0.01).encode(["a"])
    assert len(srv.requests) == 2


def test_timeout_is_retried_then_named(scripted):
    srv = scripted(lambda inputs, headers: (*answer(inputs, headers)[:2], 2.0))
    start = time.monotonic()
    with pytest.raises(EndpointError, match=f"{srv.url}/embeddings failed after 2 attempts: .*timed out"):
        EndpointEncoder(srv.url, "m", timeout_s=0.3, retries=1, backoff_s=0.01).encode(["a"])
    assert len(srv.requests) == 2 and time.monotonic() - start < 1.8


@pytest.mark.parametrize("body, why", [
    (b"<html>not json</html>", "not an embeddings list"),
    (b'{"data": [{"index": 0, "embedding": [1.0, 2.0]}]}', "1 embeddings with indices"),  # 2 inputs
    (b'{"data": [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]}', "embeddings are not lists of one length"),
    (b'{"data": [{"index": 0, "embedding": [1.0, NaN]}, {"index": 1, "embedding": [1.0, 2.0]}]}', "an embedding value is not a finite"),
    (b'{"error": "no data"}', "not an embeddings list"),
])
def test_malformed_answer_named_not_retried(scripted, body, why):
    srv = scripted(fails(200, body))
    with pytest.raises(EndpointError, match=f"{srv.url}/embeddings answered malformed data \\({why}"):
        EndpointEncoder(srv.url, "m", retries=3, backoff_s=0.01).encode(["a", "b"])
    assert len(srv.requests) == 1


def test_key_sent_from_env_never_in_messages_or_logs(scripted, monkeypatch, caplog):
    # The server echoes the Authorization header in its error body, as a badly written proxy might.
    echo = lambda inputs, headers: (503, json.dumps({"error": headers["Authorization"]}).encode(), 0.0)  # noqa: E731
    srv = scripted(echo, echo, fails(401, json.dumps({"error": f"bad key {KEY}"}).encode()))
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = openai_config(srv.url, endpoint_retries=3, endpoint_backoff_s=0.01)
    assert KEY not in repr(cfg)  # the config holds the variable's name only
    encoder = EndpointEncoder.from_config(cfg)
    with caplog.at_level(logging.DEBUG), pytest.raises(EndpointError) as err:
        encoder.encode(["a"])
    assert [h["Authorization"] for _, _, h in srv.requests] == [f"Bearer {KEY}"] * 3
    assert "HTTP 401" in str(err.value) and "***" in str(err.value) and "***" in caplog.text
    assert KEY not in str(err.value) + caplog.text + repr(encoder)


def test_missing_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"reward.endpoint_api_key_env: the environment variable {KEY_ENV}"):
        build_reward_actor(openai_config("http://127.0.0.1:9/v1"), "cpu")


def test_batches_respect_both_budgets(scripted):
    srv = scripted(answer)
    texts = ["x" * n for n in (50, 10, 200, 5, 60, 70, 1, 0, 30)]
    got = EndpointEncoder(srv.url, "m", batch_size=3, chars_per_batch=150).encode(texts).embeddings
    sent = [inputs for _, inputs, _ in srv.requests]
    assert sorted(t for batch in sent for t in batch) == sorted(texts)
    for batch in sent:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(map(len, batch)) <= 150
    assert torch.allclose(got, expected(texts))


# ---- config rules and the planner ------------------------------------------------------------------


@pytest.mark.parametrize("keys, message", [
    ({"endpoint_url": None}, "reward.endpoint_url must be an http:// or https:// URL"),
    ({"endpoint_url": "localhost:7997"}, "reward.endpoint_url must be an http:// or https:// URL"),
    ({"endpoint_model": None}, "reward.endpoint_model must name the model"),
    ({"endpoint_timeout_s": 0}, "reward.endpoint_timeout_s must be > 0"),
    ({"endpoint_retries": -1}, "reward.endpoint_retries must be >= 0"),
    ({"endpoint_backoff_s": -1.0}, "reward.endpoint_backoff_s must be >= 0"),
    ({"endpoint_chars_per_batch": 0}, "reward.endpoint_chars_per_batch must be >= 1"),
    ({"long_response": "chunk"}, "reward.long_response='chunk': with reward.backend=openai"),
    ({"encoder_path": "/models/minilm"}, "reward.encoder_path='/models/minilm' is read by an in-process encoder"),
    ({"offload_between_steps": True}, "reward.offload_between_steps=True is read by an in-process encoder"),
])
def test_bad_endpoint_keys_named(keys, message):
    good = openai_config("http://127.0.0.1:7997/v1")
    assert reward_problems(good) == []
    problems = reward_problems(dataclasses.replace(good, **keys))
    assert any(p.startswith(message) for p in problems), problems


def test_key_pasted_as_variable_name_refused_without_echo():
    problems = reward_problems(RewardConfig(backend="openai", endpoint_url="http://h/v1", endpoint_model="m",
                                            endpoint_api_key_env=KEY))
    assert len(problems) == 1 and "reward.endpoint_api_key_env must be the NAME" in problems[0]
    assert KEY not in problems[0]


def test_endpoint_url_with_another_backend_refused():
    problems = reward_problems(RewardConfig(endpoint_url="http://h/v1"))
    assert problems == ["reward.endpoint_url is read by reward.backend=openai only (backend is 'local')"]


@pytest.mark.slow
def test_cli_bad_endpoint_key_exits_2(tmp_path):
    output = cli("train", "rlsr_tiny.yaml", ["reward.backend=openai", "reward.endpoint_url=ftp://x",
                                              f"trainer.output_dir={tmp_path}"], expect=2)
    assert "reward.endpoint_url must be an http:// or https:// URL" in output
    assert "reward.endpoint_model must name the model" in output


def test_planner_counts_no_encoder_for_an_endpoint():
    from nemo_rlsr.config import load_config
    from nemo_rlsr.planner import make_plan

    local = load_config(REPO / "conf/rlsr_qwen7b_sb.yaml")
    remote = load_config(REPO / "conf/rlsr_qwen7b_sb.yaml", ["reward.backend=openai", "reward.endpoint_url=http://h/v1",
                                                      "reward.endpoint_model=m"])
    plan_local, plan_remote = make_plan(local), make_plan(remote)
    assert plan_local.memory.items["reward encoder"] > 0 and plan_local.time.phases["reward"] > 0
    assert plan_remote.memory.items["reward encoder"] == 0 and plan_remote.time.phases["reward"] == 0
    assert any("remote embeddings endpoint" in note for note in plan_remote.time.notes)
    encoder = plan_local.memory.items["reward encoder"]
    assert plan_remote.memory.phases["training"] == pytest.approx(plan_local.memory.phases["training"] - encoder)
    assert plan_remote.problems == []
