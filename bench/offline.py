"""`loraplex bench offline`: the same workload against the in-process engine, no HTTP.

Requests enter the engine at their arrival times (the step loop checks the clock between steps), so the
difference between this and `bench serve` on the same workload is the server's own overhead (HTTP, the
engine process pipe, detokenized streaming).
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

from .stats import RequestResult
from .workload import BenchRequest


def tokenize(tokenizer, req: BenchRequest) -> list[int]:
    """As the server does: chat template + encode without special tokens, or the plain prompt encoded."""
    if req.messages is not None:
        text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(req.prompt)


def register_adapters(engine, adapters: dict[str, str]) -> dict[str, tuple[int, int]]:
    """name -> (adapter_id, version) for each PEFT folder, loaded into the engine's host tier."""
    keys = {}
    for adapter_id, (name, path) in enumerate(adapters.items(), start=1):
        engine.adapter_hook.register_adapter(name, adapter_id, 1, str(path))
        keys[name] = (adapter_id, 1)
    return keys


def run_offline(engine, workload: list[BenchRequest], adapter_keys: dict[str, tuple[int, int]], *,
                ignore_eos: bool = True, progress: bool = True) -> tuple[list[RequestResult], float]:
    from loraplex.engine.core.sampling_params import SamplingParams
    prompts = [tokenize(engine.tokenizer, r) for r in workload]
    pending = sorted(workload, key=lambda r: r.arrival_s)
    results = {r.index: RequestResult(r.index, r.model, r.arrival_s, prompt_tokens=len(p))
               for r, p in zip(workload, prompts)}
    sent: dict[str, float] = {}
    run_id = next(_runs)
    start = time.perf_counter()
    done = 0
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0].arrival_s <= now:
            req = pending.pop(0)
            request_id = f"bench{run_id}-{req.index}"
            params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=ignore_eos)
            try:
                engine.add_request(request_id, prompts[req.index], params, adapter=adapter_keys.get(req.model))
            except ValueError as e:
                results[req.index].error = str(e)[:300]
                done += 1
                continue
            sent[request_id] = time.perf_counter()
        if not engine.has_unfinished_requests():
            time.sleep(min(0.01, max(0.0, pending[0].arrival_s - now)) if pending else 0)
            continue
        for out in engine.step():
            index = int(out.request_id.rsplit("-", 1)[1])
            r = results[index]
            t = time.perf_counter() - sent[out.request_id]
            if out.token_ids and r.ttft_s is None:
                r.ttft_s = t
            r.output_tokens = out.num_output_tokens
            if out.finished:
                r.e2e_s = t
                done += 1
                if progress and (done % max(1, len(workload) // 10) == 0 or done == len(workload)):
                    print(f"  {done}/{len(workload)} requests done ({time.perf_counter() - start:.1f} s)", flush=True)
    return [results[i] for i in sorted(results)], time.perf_counter() - start


_runs = itertools.count()


def synthetic_adapters(engine, folder: Path, count: int, rank: int, targets: tuple[str, ...]) -> dict[str, str]:
    """`count` random rank-`rank` PEFT adapters written under `folder`: name -> path."""
    from loraplex.adapters.synthetic import write_random_peft
    return {f"bench-a{i}": str(write_random_peft(folder / f"bench-a{i}", engine.model_config, r=rank,
                                                 target_modules=targets, seed=i, std=0.02))
            for i in range(count)}
