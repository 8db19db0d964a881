"""The README's two commands, as written, in a fresh clone: the serve command starts a working server."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_serve_and_test_commands():
    serve, test = readme_commands()[:2]
    assert serve == "bash scripts/serve.sh" and test == "bash scripts/test.sh"
    ci = (ROOT / ".ci/run").read_text()
    assert "bash scripts/test.sh" in ci


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_serve_command_in_fresh_clone(tmp_path, default_model_dir):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    port = free_port()
    serve = readme_commands()[0]
    env = {**os.environ, "LORAPLEX_VENV": str(tmp_path / "venv")}
    env.pop("VIRTUAL_ENV", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(f"{serve} --port {port} --dtype float32", shell=True, cwd=clone, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "SmolLM2-135M-Instruct", "max_tokens": 8,
                             "messages": [{"role": "user", "content": "Say hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
