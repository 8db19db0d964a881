"""The transformers + peft ways to serve several adapters without loraplex, on `loraplex bench`'s workload.

    python scripts/bench/bench_peft_baselines.py --mode sequential --num-adapters 8 [workload options] \
        --result-file docs/results/peft-sequential-8.json
    python scripts/bench/bench_peft_baselines.py --mode batched --batch-size 16 --num-adapters 8 ...

The workload options are `loraplex bench`'s, and the same --seed gives the same requests (prompts, adapters,
arrival times, output lengths) as `loraplex bench serve/offline`; the random adapters are the same ones
`bench offline --num-adapters N` writes (bench-a0.., same seeds). Two baselines:
- sequential: one request at a time in arrival order, `set_adapter(name)` (or the adapter disabled for the
  base model) then `generate`;
- batched: static batches of up to --batch-size requests in arrival order, each started when its last
  request has arrived and the previous batch is done, one `generate(adapter_names=[...])` per batch
  (peft's mixed-adapter inference; "__base__" rows use the base model), left-padded.
Greedy, min_new_tokens = max_new_tokens (ignore_eos). A stopping-criteria hook timestamps every decode
step, so TTFT, TPOT and end-to-end latency are per request, from its arrival, as in the server runs.
The result file has `loraplex bench`'s format (kind peft-sequential / peft-batched).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


class StepClock:
    """A StoppingCriteria that only records when each new token was produced."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def main() -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, StoppingCriteriaList

    from loraplex.bench.cli import ALL_LINEAR, add_workload_args, config_of, finish, workload_spec
    from loraplex.bench.offline import synthetic_adapters, tokenize
    from loraplex.bench.stats import RequestResult, report
    from loraplex.bench.workload import build_workload
    from loraplex.engine.llm_engine import _read_model_config, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF-layout folder (default: the default model)")
    ap.add_argument("--served-model-name", default="SmolLM2-135M-Instruct", help="the base model's name in the workload")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mode", choices=["sequential", "batched"], required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-adapters", type=int, default=8)
    ap.add_argument("--adapter-rank", type=int, default=8)
    ap.add_argument("--adapter-targets", default="q_proj,v_proj", help=f"comma-separated (all: {ALL_LINEAR})")
    add_workload_args(ap)
    ns = ap.parse_args()

    from loraplex.engine.default_model import model_dir_or_default
    model_dir = model_dir_or_default(ns.model)
    dtype = getattr(torch, ns.dtype)
    tokenizer = load_tokenizer(model_dir)

    class _Cfg:  # synthetic_adapters needs only engine.model_config
        model_config = _read_model_config(model_dir)
    folders = synthetic_adapters(_Cfg, Path(tempfile.mkdtemp(prefix="peft-baseline-")), ns.num_adapters,
                                 ns.adapter_rank, tuple(ns.adapter_targets.split(",")))
    spec = workload_spec(ns, ns.served_model_name, list(folders))
    workload = build_workload(spec)
    prompts = [tokenize(tokenizer, r) for r in workload]

    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    names = list(folders)
    model = PeftModel.from_pretrained(base, folders[names[0]], adapter_name=names[0]) if names else base
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(f"peft {ns.mode}: {len(workload)} requests, {len(names)} adapters, {ns.dtype}, "
          f"{torch.get_num_threads()} threads")

    def generate(batch):
        width = max(len(prompts[r.index]) for r in batch)
        ids = torch.tensor([[pad] * (width - len(prompts[r.index])) + prompts[r.index] for r in batch])
        mask = torch.tensor([[0] * (width - len(prompts[r.index])) + [1] * len(prompts[r.index]) for r in batch])
        steps = max(r.max_tokens for r in batch)
        clock = StepClock()
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                  pad_token_id=pad, stopping_criteria=StoppingCriteriaList([clock]))
        with torch.inference_mode():
            if ns.mode == "batched" and names:
                model.generate(**kw, adapter_names=[r.model if r.model in folders else "__base__" for r in batch])
            elif names and batch[0].model in folders:
                model.set_adapter(batch[0].model)
                model.generate(**kw)
            elif names:
                with model.disable_adapter():
                    model.generate(**kw)
            else:
                model.generate(**kw)
        return clock.times

    warm = workload[:2]
    generate(warm[:1])  # one-time costs out
    order = sorted(workload, key=lambda r: r.arrival_s)
    size = ns.batch_size if ns.mode == "batched" else 1
    results = []
    start = time.perf_counter()
    for i in range(0, len(order), size):
        batch = order[i:i + size]
        wait = batch[-1].arrival_s - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        times = generate(batch)
        for r in batch:
            arrival = start + r.arrival_s
            results.append(RequestResult(r.index, r.model, r.arrival_s, len(prompts[r.index]), r.max_tokens,
                                         ttft_s=times[0] - arrival, e2e_s=times[r.max_tokens - 1] - arrival))
        print(f"  {min(i + size, len(order))}/{len(order)} requests done ({time.perf_counter() - start:.1f} s)",
              flush=True)
    duration = time.perf_counter() - start
    result = report(f"peft-{ns.mode}", config_of(ns, spec, dtype=ns.dtype, adapter_rank=ns.adapter_rank,
                                                 batch_size=size), results, duration)
    raise SystemExit(finish(ns, result))


if __name__ == "__main__":
    main()
