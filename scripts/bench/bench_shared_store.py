"""Two servers on one PostgreSQL database and S3 bucket (issue 17): how long from an upload on server A until
server B answers a request with that adapter (its change log followed through NOTIFY, the files pulled from
S3 on the first request), and what the first request on B costs against a warm one.

    python scripts/bench/bench_shared_store.py [--adapters 8] [--model DIR]

Starts a throwaway PostgreSQL cluster and SeaweedFS (`weed mini`) on free 127.0.0.1 ports, and two
`loraplex serve` processes (the default model, fp32, no trainer). Each adapter is a random rank-8 PEFT folder
uploaded with POST /v1/load_lora_adapter on A; then B is asked for it (max_tokens 1) until it answers 200.
Prints one line per adapter and the medians. Run on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ helpers: the services and the server

from tests.adapters.peft_factory import write_random_peft  # noqa: E402
from tests.e2e.conftest import Server  # noqa: E402
from tests.services import start_postgres, start_seaweedfs  # noqa: E402


def ask(server: Server, model: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    return r.status_code, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--model", default=None)
    args = p.parse_args()
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.llm_engine import _read_model_config
    model_dir = args.model or str(ensure_default_model())
    config = _read_model_config(model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    pg = start_postgres()
    s3 = start_seaweedfs(work / "seaweedfs")
    os.environ.update(s3.env())
    servers: list[Server] = []
    try:
        shared = ["--database", pg.create_database(f"bench_{uuid.uuid4().hex[:8]}"),
                  "--blob-store", f"s3://bench-{uuid.uuid4().hex[:8]}/adapters"]
        for _ in range(2):
            servers.append(Server(["--model", model_dir, "--dtype", "float32", "--served-model-name", "smol",
                                   "--no-enable-training", *shared]))
        a, b = servers
        visible, first, warm = [], [], []
        for i in range(args.adapters):
            folder = write_random_peft(work / f"a{i}", config, r=8, seed=100 + i, std=0.04)
            r = httpx.post(a.base_url + "/v1/load_lora_adapter", timeout=60,
                           json={"lora_name": f"bench-{i}", "lora_path": str(folder)})
            assert r.status_code == 200, r.text
            t_published = time.perf_counter()
            while True:
                status, took = ask(b, f"bench-{i}")
                if status == 200:
                    break
                time.sleep(0.01)
            visible.append(time.perf_counter() - t_published)
            first.append(took)
            warm.append(ask(b, f"bench-{i}")[1])
            print(f"adapter {i}: answered on B {1000 * visible[-1]:.0f} ms after the upload returned on A "
                  f"(that first request {1000 * first[-1]:.0f} ms, a warm one {1000 * warm[-1]:.0f} ms)", flush=True)
        print(f"\nmedian over {args.adapters}: upload on A -> answer on B {1000 * statistics.median(visible):.0f} ms; "
              f"first request on B {1000 * statistics.median(first):.0f} ms (pull from S3 + register + 1 token), "
              f"warm {1000 * statistics.median(warm):.0f} ms")
    finally:
        for s in servers:
            s.stop()
        s3.stop()
        pg.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
