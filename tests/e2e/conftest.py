"""A real loraplex server on a free 127.0.0.1 port, serving the default model."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], timeout_s: float = 180.0) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = f"/tmp/loraplex-e2e-{self.port}.log"
        import tempfile
        if "--adapter-dir" not in args:  # hermetic: never the user's stores
            args = [*args, "--adapter-dir", tempfile.mkdtemp(prefix="loraplex-e2e-adapters-")]
        if "--fine-tuning-dir" not in args:
            args = [*args, "--fine-tuning-dir", tempfile.mkdtemp(prefix="loraplex-e2e-ft-")]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "loraplex.serve.cli", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port), *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)  # its own group: kill() reaches the engine too
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{open(self.log_path).read()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout_s}s:\n{open(self.log_path).read()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its engine process at once, as a crash would."""
        import signal
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        self._log.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="module")
def server(default_model_dir):
    srv = Server(["--model", str(default_model_dir), "--dtype", "float32", "--max-model-len", "512",
                  "--max-num-seqs", "16", "--served-model-name", "smol"])
    yield srv
    srv.stop()


def smol_server(default_model_dir, *args: str, dtype: str = "float32") -> Server:
    """The default model served as "smol", no trainer; `args`: more `loraplex serve` flags."""
    return Server(["--model", str(default_model_dir), "--dtype", dtype, "--served-model-name", "smol",
                   "--no-enable-training", *args])


@pytest.fixture(scope="session")
def quill_adapter(default_model_dir, tmp_path_factory):
    """A random rank-8 q/v PEFT adapter of the default model (tests serve it as "quill")."""
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import write_random_peft
    return write_random_peft(tmp_path_factory.mktemp("peft") / "quill", _read_model_config(str(default_model_dir)),
                             r=8, seed=3, std=0.04)
