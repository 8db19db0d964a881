"""deploy/docker/install.sh, the images' only install step, in a fresh venv: it leaves a working `loraplex`, and
the README's server (`loraplex serve` on the default model) starts from it and answers. No container engine
runs here, so this is how the images' contents are tested."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).parents[2]


def test_install_script_leaves_a_working_server(tmp_path, default_model_dir):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # pip's own index for torch here (the image uses the CPU wheel index); the default extras
    env = {**os.environ, "PYTHON": str(python), "TORCH_INDEX_URL": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("EXTRAS", None)
    done = subprocess.run(["bash", str(ROOT / "deploy" / "docker" / "install.sh"), str(ROOT)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "loraplex ready" in done.stderr
    # installed, not linked to this checkout
    where = subprocess.run([str(python), "-c", "import loraplex.serve.cli as m; print(m.__file__)"],
                           capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(ROOT) not in where
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in the finally below
    server = subprocess.Popen([str(venv / "bin" / "loraplex"), "serve", "--port", str(port), "--dtype", "float32"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200 and \
                        httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        (model,) = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"], r.text
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_install_script_refuses_bad_input(tmp_path):
    script = str(ROOT / "deploy" / "docker" / "install.sh")
    done = subprocess.run(["bash", script, str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "no pyproject.toml" in done.stderr
    done = subprocess.run(["bash", script, str(ROOT)], capture_output=True, text=True, check=False,
                          env={**os.environ, "EXTRAS": "cluster; rm -rf /"})
    assert done.returncode == 2 and "EXTRAS must be" in done.stderr
