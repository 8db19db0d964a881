"""`loraplex bench serve` and `loraplex bench offline`: argument parsing and the run."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
import math
import tempfile
from pathlib import Path

from .stats import format_summary, report
from .workload import WorkloadSpec, build_workload

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def add_workload_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=64)
    w.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals, requests/s (default inf: all at once)")
    w.add_argument("--adapter-dist", choices=["uniform", "powerlaw"], default="uniform",
                   help="adapter popularity (powerlaw: p(i) ~ (i+1)^-alpha in the order listed)")
    w.add_argument("--powerlaw-alpha", type=float, default=1.0)
    w.add_argument("--base-fraction", type=float, default=0.0, help="share of requests to the base model")
    w.add_argument("--input-len", type=int, default=64, help="synthetic prompt length in words (~tokens)")
    w.add_argument("--output-len", type=int, default=64, help="output tokens per request (max_tokens)")
    w.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly in len*(1-r)..len*(1+r)")
    w.add_argument("--dataset", default=None,
                   help="JSONL of {\"prompt\": ...} or {\"messages\": [...]}, optional \"max_tokens\"")
    w.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    w.add_argument("--no-ignore-eos", action="store_true",
                   help="let requests stop at EOS (default: ignore_eos, every request makes its output length)")
    if seed:  # offline: the engine's --seed seeds the workload too
        w.add_argument("--seed", type=int, default=0, help="the workload's seed (same seed, same requests)")
    w.add_argument("--result-file", default=None, help="write the JSON result here")
    w.add_argument("--label", default=None, help="a free-form name stored in the result (plots use it)")


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark a server (`serve`) or the in-process engine (`offline`) "
                           "with a multi-adapter workload")
    bench.set_defaults(run=run_bench)
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser("serve", help="load an OpenAI-compatible server (loraplex, vLLM, LoRAX, ...)")
    serve.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    serve.add_argument("--model", required=True, dest="bench_model", help="the base model's served name")
    serve.add_argument("--adapters", default="", help="comma-separated adapter names the server serves")
    serve.add_argument("--api-key", default=None)
    serve.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    add_workload_args(serve)
    offline = kinds.add_parser("offline", help="the same workload against the in-process engine (no HTTP)")
    from loraplex.engine.engine_args import add_engine_args
    lora = add_engine_args(offline)["lora"]  # every engine option `loraplex serve` has
    offline.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                         help="the base model's name in the workload (default: the model folder's name)")
    offline.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", help="PEFT folders to serve")
    offline.add_argument("--num-adapters", type=int, default=0,
                         help="also serve this many random adapters, named bench-a0.. (PEFT folders in a temp dir)")
    offline.add_argument("--adapter-rank", type=int, default=8)
    offline.add_argument("--adapter-targets", default="q_proj,v_proj", help=f"comma-separated (all: {ALL_LINEAR})")
    offline.add_argument("--adapters", default=None,
                         help="names to spread requests over (default: every --lora-modules and random adapter)")
    add_workload_args(offline, seed=False)


def workload_spec(ns: argparse.Namespace, model: str, adapters: list[str]) -> WorkloadSpec:
    return WorkloadSpec(model=model, adapters=tuple(adapters), num_prompts=ns.num_prompts,
                        request_rate=ns.request_rate, adapter_dist=ns.adapter_dist,
                        powerlaw_alpha=ns.powerlaw_alpha, base_fraction=ns.base_fraction, input_len=ns.input_len,
                        output_len=ns.output_len, range_ratio=ns.range_ratio, dataset=ns.dataset,
                        endpoint=ns.endpoint, seed=ns.seed)


def config_of(ns: argparse.Namespace, spec: WorkloadSpec, **extra) -> dict:
    cfg = dataclasses.asdict(spec) | extra
    cfg["request_rate"] = None if math.isinf(spec.request_rate) else spec.request_rate  # JSON has no inf
    cfg["num_adapters"] = len(spec.adapters)
    cfg["label"] = ns.label
    cfg["ignore_eos"] = not ns.no_ignore_eos
    cfg["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return cfg


def finish(ns: argparse.Namespace, result: dict) -> int:
    print(format_summary(result))
    if ns.result_file:
        path = Path(ns.result_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"result written to {path}")
    return 0 if result["overall"]["completed"] else 1


def run_bench(ns: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    try:
        if ns.bench_command == "serve":
            return bench_serve(ns)
        return bench_offline(ns)
    except ValueError as e:
        print(f"error: {e}")
        return 2


def bench_serve(ns: argparse.Namespace) -> int:
    from .serve_client import run_serve
    adapters = [a for a in ns.adapters.split(",") if a]
    spec = workload_spec(ns, ns.bench_model, adapters)
    workload = build_workload(spec)
    print(f"bench serve: {len(workload)} requests to {ns.base_url} ({len(adapters)} adapters, "
          f"rate {ns.request_rate} req/s)")
    results, duration = asyncio.run(run_serve(ns.base_url, workload, ignore_eos=not ns.no_ignore_eos,
                                              api_key=ns.api_key, max_concurrency=ns.max_concurrency))
    return finish(ns, report("serve", config_of(ns, spec, base_url=ns.base_url), results, duration))


def bench_offline(ns: argparse.Namespace) -> int:
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.engine.default_model import default_served_model_name
    from loraplex.engine.engine_args import engine_args_from, parse_lora_modules
    from loraplex.engine.llm_engine import LLMEngine

    from .offline import register_adapters, run_offline, synthetic_adapters
    modules = parse_lora_modules(ns.lora_modules)
    args = dataclasses.replace(engine_args_from(ns), enable_training=False)
    wanted = len(modules) + ns.num_adapters
    if wanted and (args.max_cpu_loras or 0) < wanted + 1:
        args = dataclasses.replace(args, max_cpu_loras=wanted + 1)
    engine = LLMEngine.from_engine_args(args, hook_factory=create_lora_runtime if args.enable_lora else None)
    if ns.num_adapters:
        targets = tuple(t for t in ns.adapter_targets.split(",") if t)
        tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-"))
        modules |= synthetic_adapters(engine, tmp, ns.num_adapters, ns.adapter_rank, targets)
    if modules and engine.adapter_hook is None:
        raise ValueError("adapters need LoRA enabled (drop --no-enable-lora)")
    keys = register_adapters(engine, modules) if modules else {}
    adapters = [a for a in ns.adapters.split(",") if a] if ns.adapters is not None else list(modules)
    unknown = [a for a in adapters if a not in keys]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}: give them with --lora-modules or --num-adapters")
    base = (ns.served_model_name or [default_served_model_name(ns.model)])[0]
    spec = workload_spec(ns, base, adapters)
    workload = build_workload(spec)
    warm = dataclasses.replace(spec, num_prompts=min(4, spec.num_prompts), request_rate=math.inf, output_len=2,
                               range_ratio=0.0, seed=spec.seed + 1)
    run_offline(engine, build_workload(warm), keys, progress=False)  # one-time costs (oneDNN primitives) out
    print(f"bench offline: {len(workload)} requests ({len(adapters)} adapters, rate {ns.request_rate} req/s), "
          f"device {engine.runner.device}, dtype {engine.runner.dtype}")
    results, duration = run_offline(engine, workload, keys, ignore_eos=not ns.no_ignore_eos)
    return finish(ns, report("offline", config_of(ns, spec, engine_model=ns.model, dtype=str(engine.runner.dtype),
                                                  adapter_rank=ns.adapter_rank), results, duration))
