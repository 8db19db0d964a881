"""loraplex cluster on a local Ray instance (issue 17's numbers): adapter routing affinity and loads per version
per replica for 2 replicas, 32 adapters and power-law popularity, the cluster path's throughput against one
`loraplex serve` process on the same machine, and a hot adapter spread over both replicas or kept on one.

    python scripts/bench/bench_cluster.py [--adapters 32] [--requests 256] [--concurrency 8] [--model DIR]
    python scripts/bench/bench_cluster.py --hot [--requests 128] [--concurrency 16] [--spread-queue 4]

Starts PostgreSQL and SeaweedFS (tests/services.py), a local Ray instance with the cluster (2 engine replicas,
fp32, no trainer) and, afterwards, a single server on the same stores. Requests pick adapter i with
probability proportional to 1 / (i + 1) (Zipf, s = 1), 16 output tokens each, `--concurrency` at a time.
The ingress's /metrics counts the adapter versions each replica pulled (`loraplex:replica_adapter_pulls`);
affinity = 1 - pulls / adapter requests (every request that finds its version on its replica is a hit). On 2
cores the replicas share the CPUs, so no speed-up is expected: the ratio shows the cluster path's overhead.
`--hot`: every request asks for one adapter; the cluster runs twice, with `--spread-queue N` (the router lets
the second replica load the adapter once each holder has N requests) and with spreading off (the adapter
stays on the replica that has it), and prints both throughputs.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.adapters.peft_factory import write_random_peft
from tests.e2e.conftest import Server
from tests.services import start_postgres, start_seaweedfs

PULLS = re.compile(r'^loraplex:replica_adapter_pulls_total\{adapter="([^"]+)",replica="([^"]+)"\} (\S+)$')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(base_url: str, models: list[str], concurrency: int) -> tuple[float, int]:
    """-> (seconds, generated tokens) for all requests, `concurrency` at a time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for m in models:
        queue.put_nowait(m)
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            model = queue.get_nowait()
            r = await client.post(base_url + "/v1/completions", json={
                "model": model, "prompt": "Tell me a story about", "max_tokens": 16, "temperature": 0,
                "ignore_eos": True})
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return time.perf_counter() - t0, tokens


def pulls_of(url: str) -> collections.Counter:
    """(replica, adapter version) -> pulls, from the ingress's /metrics."""
    pulls = collections.Counter()
    for line in httpx.get(url + "/metrics").text.splitlines():
        m = PULLS.match(line)
        if m:
            pulls[(m[2], m[1])] = int(float(m[3]))
    return pulls


def run_cluster(flags: list[str], names: list[str], work: Path, config, env: dict, models: list[str],
                concurrency: int) -> tuple[float, int, collections.Counter]:
    import ray
    from ray import serve

    from loraplex.serve.cluster import build_application
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application([*flags, "--num-replicas", "2", "--replica-cpus", "0.5"]), name="loraplex",
                  route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        while httpx.get(url + "/ready").status_code != 200:
            time.sleep(0.5)
        for name in names:
            folder = work / name
            if not folder.exists():
                write_random_peft(folder, config, r=8, seed=int(name[1:]), std=0.04)
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)},
                           timeout=120)
            r.raise_for_status()
        asyncio.run(drive(url, ["smol"] * 8, 4))  # warm-up
        seconds, tokens = asyncio.run(drive(url, models, concurrency))
        fresh = work / "fresh"
        if not fresh.exists():
            write_random_peft(fresh, config, r=8, seed=999, std=0.04)
        t0 = time.perf_counter()  # a new adapter: upload through the ingress -> its first token from a replica
        httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(fresh)},
                   timeout=120).raise_for_status()
        t1 = time.perf_counter()
        httpx.post(url + "/v1/completions", json={"model": "fresh", "prompt": "Hi", "max_tokens": 1},
                   timeout=120).raise_for_status()
        t2 = time.perf_counter()
        print(f"new adapter: upload {1000 * (t1 - t0):.0f} ms, then first token from a replica (a pull) "
              f"{1000 * (t2 - t1):.0f} ms; upload to first token {1000 * (t2 - t0):.0f} ms")
        for name in set(models):  # one more request each: every replica reports its pulls with its last output
            asyncio.run(drive(url, [name], 1))
        pulls = pulls_of(url)
        return seconds, tokens, collections.Counter({k: v for k, v in pulls.items() if k[1] != "fresh@v1"})
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--hot", action="store_true", help="one adapter for every request: spreading on vs off")
    p.add_argument("--spread-queue", type=int, default=4)
    p.add_argument("--model", default=None)
    ns = p.parse_args()
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.llm_engine import _read_model_config
    model_dir = ns.model or str(ensure_default_model())
    config = _read_model_config(model_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    pg, s3 = start_postgres(), start_seaweedfs(work / "seaweedfs")
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **s3.env()}
    os.environ.update(env)
    flags = ["--model", model_dir, "--dtype", "float32", "--max-model-len", "512", "--served-model-name", "smol",
             "--no-enable-training"]

    def stores() -> list[str]:
        return ["--database", pg.create_database(f"bench_{uuid.uuid4().hex[:8]}"),
                "--blob-store", f"s3://bench-cluster/{uuid.uuid4().hex[:8]}"]
    try:
        if ns.hot:
            models = ["a0"] * ns.requests
            results = {}
            for label, spread in (("spread", ns.spread_queue), ("one replica", 1_000_000)):
                seconds, tokens, pulls = run_cluster([*flags, *stores(), "--spread-queue", str(spread)], ["a0"],
                                                     work, config, env, models, ns.concurrency)
                results[label] = tokens / seconds
                print(f"hot adapter, {label} (--spread-queue {spread}): {tokens / seconds:.1f} tok/s, replicas "
                      f"that pulled it: {sorted(r for r, _ in pulls)}")
            print(f"spread / one replica: {results['spread'] / results['one replica']:.2f}")
            return 0
        rng = random.Random(0)
        names = [f"a{i}" for i in range(ns.adapters)]
        weights = [1 / (i + 1) for i in range(ns.adapters)]
        models = rng.choices(names, weights, k=ns.requests)
        shared = stores()
        cluster_s, cluster_tokens, pulls = run_cluster([*flags, *shared], names, work, config, env, models,
                                                       ns.concurrency)
        server = Server([*flags, *shared])
        try:
            asyncio.run(drive(server.base_url, ["smol"] * 8, 4))
            single_s, single_tokens = asyncio.run(drive(server.base_url, models, ns.concurrency))
        finally:
            server.stop()
    finally:
        s3.stop()
        pg.remove()
    total_pulls = sum(pulls.values())
    per_version = collections.Counter(pulls.values())
    replicas = {r for r, _ in pulls}
    print(f"{ns.requests} adapter requests over {ns.adapters} adapters (Zipf), concurrency {ns.concurrency}")
    print(f"affinity: {1 - total_pulls / ns.requests:.3f} ({total_pulls} pulls on {len(replicas)} replicas for "
          f"{len(set(models))} distinct versions requested)")
    print(f"loads per version per replica: {dict(sorted(per_version.items()))} (times loaded: how many)")
    on_both = sum(1 for name in {m for _, m in pulls} if sum(1 for _, m in pulls if m == name) > 1)
    print(f"versions loaded on both replicas: {on_both}")
    print(f"throughput: cluster {cluster_tokens / cluster_s:.1f} tok/s, one process {single_tokens / single_s:.1f} "
          f"tok/s, ratio {cluster_tokens / cluster_s / (single_tokens / single_s):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
