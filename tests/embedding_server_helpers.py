"""A real OpenAI-compatible embeddings server on loopback for the `reward.backend: openai` tests:
infinity-emb serving the bundled MiniLM folder on CPU, from its own venv.

`server_venv()` builds that venv once (tests/embedding_server/install.sh, ~1.5 min and 1.4 GiB on a
fresh machine; reused afterwards). When it cannot be built the tests skip, except under CI=true,
where they fail: a CI run that skipped them would have checked nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cli_runner import REPO, free_port

INSTALL = REPO / "tests" / "embedding_server" / "install.sh"
VENV = REPO / ".venv-embed-server"
MODEL_NAME = "minilm"  # the name the server serves the bundled folder under (the request's `model`)


def server_venv() -> Path:
    """The server's venv, installed if missing."""
    result = subprocess.run(["bash", str(INSTALL), str(VENV)], capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        message = f"cannot install the embeddings server ({INSTALL.relative_to(REPO)}): {result.stderr[-2000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return VENV


class EmbeddingServer:
    """`infinity_emb v2` on 127.0.0.1:<free port>, base URL `<url>` (= http://127.0.0.1:PORT/v1)."""

    def __init__(self, log: Path, api_key: str | None = None) -> None:
        from nemo_rlsr.rewards import bundled_minilm_path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.api_key = api_key
        argv = [str(server_venv() / "bin" / "infinity_emb"), "v2", "--model-id", bundled_minilm_path(),
                "--served-model-name", MODEL_NAME, "--engine", "torch", "--device", "cpu", "--dtype", "float32",
                "--no-bettertransformer", "--no-model-warmup", "--host", "127.0.0.1", "--port", str(self.port),
                "--url-prefix", "/v1", "--log-level", "warning"]
        if api_key:
            argv += ["--api-key", api_key]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env |= {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                "OMP_NUM_THREADS": "1"}
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"embeddings server exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise AssertionError(f"embeddings server not ready after {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server (its whole session) and reap it."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
