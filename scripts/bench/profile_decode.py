"""Where a decode step goes (issue 23): one engine decode step at batch 1, 4 and 16, per dtype, split into the time
its weights take to stream from memory at this machine's measured bandwidth and everything else.

    python scripts/bench/profile_decode.py [--dtype bfloat16 float32] [--batch 1 4 16] [--steps 24] [--top 12]
        [--cpu-linear onednn stream] [--stack on per-op off] [--server-runtimes] [--model FOLDER]
        [--quantization gptq] [--kv-cache-dtype bfloat16] [--phases] [--adapter-rank 8] [--stream-ahead 0]

For each (dtype, batch): the median wall time of `--steps` single decode steps (no profiler; the engine runs without
multi-step groups), the bytes of weights a step reads (every linear and the head as their kernels read them: see
weight_bytes; the embedding only by rows), that over the bandwidth measured here (a streaming
read of a 1 GiB buffer with the engine's threads) = the bandwidth bound, and the share of the step it is; then a
torch.profiler pass over the same steps: operator calls per step, the time inside operators, the rest (Python,
dispatch, scheduling, sampling outside ops) and the operators that cost most. --phases adds, before the profiler
pass, the whole-stack call's own clock (DecoderStack.set_profiling): ms per step in its norms, each linear, adapter
rows, attention and elementwise work, and each linear's GB/s against the measured bandwidth. --adapter-rank R adds a
random rank-R q/v adapter (as latency_vs_llama_cpp.py's): each batch's steps are timed base and on the adapter,
alternating --rounds times, their medians and ratio printed, and the phases (with --phases) and the profile are of
the adapter's steps. --stream-ahead BYTES times each batch's steps likewise at the build's weight prefetch distance
(cpu_kernels.stream_ahead) and at BYTES (0: none), alternating, and prints both and their ratio (the distance never changes a result).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_engine import make_prompts

STACK_LABEL = "loraplex::whole-stack call"


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """The best of `repeats` streaming reads (a sum) of a `gib` GiB float32 buffer, in GB/s: on normal pages and, where
    the kernel offers them, on transparent huge pages (as the engine keeps its weights), the better of the two."""
    from loraplex.engine.hugepages import move_to_huge_pages_tensors
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = float("inf")
    for huge in (False, True):
        if huge and not move_to_huge_pages_tensors([x], "bandwidth buffer"):
            break
        x.sum()
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def unread_zeros(model: torch.nn.Module) -> set[int]:
    """ids of the per-group zero points no kernel reads: those of streamed linears (fused groups' included) that take
    one zero point for all (`StreamLinear.zero_point`, counted itself as one of the linear's buffers)."""
    from loraplex.engine.quant.stream import StreamLinear
    linears = [m for m in model.modules() if isinstance(m, StreamLinear)]
    linears += [m.group.linear for m in linears if m.group is not None]
    return {id(m.zeros) for m in linears if m.zero_point is not None}


def weight_bytes(model: torch.nn.Module, greedy_head=None) -> int:
    """Bytes of weights a batch-1 decode step's kernels read: every parameter and buffer of the decoder layers, the
    final norm and the head (a tied head reads the embedding matrix once; the embedding lookup itself only touches a
    row per token), less the per-group zero points no kernel reads (`unread_zeros`) and, with `greedy_head` (the
    runner's screened greedy head, which plain-greedy steps take), the dense head itself, replaced by its 8-bit
    screening copy and row norms (the few candidate rows it then reads in full are left out)."""
    from loraplex.engine.quant import distinct_tensor_bytes
    from loraplex.engine.quant.stream import named_weights
    unread, added, head_at = unread_zeros(model), [], None
    if greedy_head is not None:  # the dense head and every tensor over its memory (a tied embedding)
        head_at = greedy_head.head.weight.data_ptr()
        screen = greedy_head.screen
        added = [screen.weight, screen.scales, screen.kernel_zeros, greedy_head.norms]
    tensors = named_weights(model)  # fused siblings' weights live in their StreamGroup, not a submodule
    # each byte once: a streamed tied head is another tensor over the embedding's memory
    return distinct_tensor_bytes([t for name, t in tensors if "rotary" not in name and id(t) not in unread and
                                  (head_at is None or t.data_ptr() != head_at) and
                                  not (name.startswith("model.embed_tokens") and not _tied(model))] + added)


def _tied(model) -> bool:
    return getattr(model.config, "tie_word_embeddings", False)


def decode_steps(engine, batch: int, prompts, steps: int, adapter: tuple | None = None) -> list[float]:
    """Start `batch` requests (on `adapter`, an (id, version) registered), run until every one is decoding, then
    time `steps` decode steps (single steps: an engine that groups greedy steps, --num-scheduler-steps, is refused)."""
    if engine.scheduler.scheduler_config.num_scheduler_steps != 1:
        raise ValueError("decode_steps times single decode steps: build the engine with num_scheduler_steps=1")
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=steps + 64, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"prof-{time.monotonic_ns()}-{i}", prompts[i % len(prompts)], params, adapter=adapter)
    for _ in range(64):  # prefills (chunked) then a few decodes
        engine.step()
        if all(r.num_computed_tokens >= len(r.prompt_token_ids) for r in engine.scheduler.running) and \
                len(engine.scheduler.running) == batch:
            break
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times


LINEAR_PHASES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                 "down": ("down_proj",)}


def alternating_medians(engine, batch: int, prompts, steps: int, rounds: int, choices: tuple, apply) -> dict:
    """choice -> the median time of `steps` decode steps at `batch` in each of `rounds` runs, the choices alternating
    (in reverse order every other round); `apply(choice)` sets a choice up and gives the adapter its steps run on."""
    medians = {c: [] for c in choices}
    for r in range(rounds):
        for c in (choices if r % 2 == 0 else choices[::-1]):
            medians[c].append(statistics.median(decode_steps(engine, batch, prompts, steps, apply(c))))
            finish(engine)
    return medians


def prefetch_at(nbytes: int) -> None:
    """--stream-ahead's choices: the weight prefetch distance, base steps."""
    from loraplex.engine.kernels import cpu_kernels
    cpu_kernels.stream_ahead(nbytes)


def linear_phase_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of weights (codes, scales, the zero points the kernel takes, bias) each linear phase of the stack reads
    in a step, every layer."""
    from loraplex.engine.quant import distinct_tensor_bytes
    from loraplex.engine.quant.stream import named_weights
    unread = unread_zeros(model)
    named = [(n, t) for n, t in named_weights(model) if ".layers." in n and id(t) not in unread]
    return {phase: distinct_tensor_bytes([t for n, t in named if any(f".{m}." in n for m in mods)])
            for phase, mods in LINEAR_PHASES.items()}


def print_phases(engine, batch: int, prompts, steps: int, step_ms: float, bandwidth: float,
                 adapter: tuple | None = None) -> None:
    """`steps` decode steps with the whole-stack call's phase clock on: ms per lean call (a decode step) in each
    phase, summed over the layers, each linear's GB/s against the measured bandwidth, and the phases' total beside
    the step's time (the rest is the head, sampling and the step's Python)."""
    from loraplex.engine.layers import fused_layer
    stacks = [s.stack for s in list(fused_layer._STACKS.values()) if s.stack is not None]
    if not stacks:
        print("  phases: no whole-stack call was built (the layers ran one by one)", flush=True)
        return
    stack = stacks[-1]
    calls = stack.lean_calls()
    stack.set_profiling(True)
    try:
        decode_steps(engine, batch, prompts, steps, adapter)
        taken = stack.lean_calls() - calls
        ns = stack.phase_ns()
    finally:
        stack.set_profiling(False)
    finish(engine)
    if taken == 0:
        print("  phases: no step took the stack's lean path (batches over 16 rows, adapters it cannot apply)",
              flush=True)
        return
    names = stack.phase_names()
    per_step = {name: t / 1e6 / taken for name, t in zip(names, ns)}
    nbytes = linear_phase_bytes(engine.runner.model)
    inside = sum(per_step.values())
    print(f"  stack phases (ms per step, {taken} lean calls{' on the adapter' if adapter else ''}; the step was "
          f"{step_ms:.2f} ms, {inside:.2f} in the stack):", flush=True)
    for name in names:
        line = f"    {name:12s} {per_step[name]:7.3f} ms"
        if name in nbytes and per_step[name] > 0:
            gbs = nbytes[name] / (per_step[name] / 1e3) / 1e9
            line += (f"  {nbytes[name] / 1e6:6.1f} MB  {gbs:5.1f} GB/s ({100 * gbs / bandwidth:.0f}% of the measured "
                     f"{bandwidth:.1f})")
        print(line, flush=True)


def finish(engine) -> None:
    engine.abort_requests([r.request_id for r in list(engine.scheduler.running) + list(engine.scheduler.waiting)])
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--cpu-linear", nargs="+", default=["onednn", "stream"], choices=["auto", "onednn", "stream"],
                   help="base linears to profile (each in turn): oneDNN-prepacked, or the weight-streaming kernel")
    p.add_argument("--server-runtimes", action="store_true",
                   help="install the adapter and training runtimes as `loraplex serve` does (their wrappers on every "
                        "linear, idle: base rows only)")
    p.add_argument("--stack", nargs="+", default=["on"], choices=["on", "per-op", "off"],
                   help="the whole-stack call (on: decode batches on its lean path), the stack operator by operator "
                        "(per-op) or the one-call layers one by one (off), each in turn")
    p.add_argument("--quantization", default="none", help="as `loraplex serve --quantization` (e.g. gptq)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16"])
    p.add_argument("--phases", action="store_true",
                   help="also time the whole-stack call's phases (its lean path; norms, each linear, adapter rows, "
                        "attention, elementwise) over the same steps, each linear's weights against the bandwidth")
    p.add_argument("--adapter-rank", type=int, default=0,
                   help="also time each batch on a random rank-R q/v adapter, alternating with base steps")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternations (base/adapter with --adapter-rank, the two distances with --stream-ahead)")
    p.add_argument("--stream-ahead", type=int, default=None, metavar="BYTES",
                   help="also time each batch at this weight prefetch distance, against the build's")
    args = p.parse_args()
    if args.stream_ahead is not None and args.adapter_rank:
        p.error("--stream-ahead and --adapter-rank each alternate the steps: one at a time")

    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.models import llama

    model = args.model or str(ensure_default_model())
    bandwidth = read_bandwidth_gbs()
    print(f"decode step profile: {model}, threads={torch.get_num_threads()}, measured read bandwidth "
          f"{bandwidth:.1f} GB/s", flush=True)
    from loraplex.engine.layers import fused_layer
    hooks = (None, None)
    if args.server_runtimes or args.adapter_rank:
        from loraplex.adapters.runtime import create_lora_runtime
        from loraplex.trainer.service import create_training_runtime
        hooks = (create_lora_runtime, create_training_runtime if args.server_runtimes else None)
    for dtype, cpu_linear, stack in [(d, c, st) for d in args.dtype for c in args.cpu_linear for st in args.stack]:
        fused_layer.set_enabled(True, stack=stack != "off", lean=stack == "on")
        engine = LLMEngine.from_engine_args(EngineArgs(model=model, dtype=dtype, max_num_seqs=max(args.batch),
                                                       enable_prefix_caching=False, cpu_linear=cpu_linear,
                                                       quantization=args.quantization,
                                                       kv_cache_dtype=args.kv_cache_dtype,
                                                       enable_lora=bool(args.adapter_rank),
                                                       # one decode step per engine step (groups: bench_multi_step.py)
                                                       num_scheduler_steps=1),
                                            *hooks)
        adapter = None
        if args.adapter_rank:
            import tempfile

            from loraplex.adapters.synthetic import write_random_peft
            from loraplex.engine.llm_engine import _read_model_config
            folder = write_random_peft(Path(tempfile.mkdtemp(prefix="profile-decode-")) / "a0",
                                       _read_model_config(model), r=args.adapter_rank, seed=0, std=0.02)
            engine.adapter_hook.register_adapter("a0", 1, 1, str(folder))
            adapter = (1, 1)
        prompts = make_prompts(engine.tokenizer, max(args.batch))
        nbytes = weight_bytes(engine.runner.model, engine.runner.greedy_head)
        bound_ms = nbytes / (bandwidth * 1e9) * 1e3
        for batch in args.batch:
            if adapter:
                medians = alternating_medians(engine, batch, prompts, args.steps, args.rounds, (None, adapter),
                                              lambda on: on)
                base_ms, step_ms = (statistics.median(medians[k]) * 1e3 for k in (None, adapter))
                print(f"\n{dtype} {cpu_linear} batch {batch}: base step {base_ms:.2f} ms, on a rank-{args.adapter_rank} "
                      f"q/v adapter {step_ms:.2f} ms (+{step_ms - base_ms:.2f} ms; adapter/base tok/s "
                      f"{base_ms / step_ms:.3f}, medians of {args.rounds} alternating rounds)", flush=True)
            elif args.stream_ahead is not None:
                from loraplex.engine.kernels import cpu_kernels
                distances = (cpu_kernels.stream_ahead(), args.stream_ahead)
                try:
                    medians = alternating_medians(engine, batch, prompts, args.steps, args.rounds, distances,
                                                  prefetch_at)
                finally:
                    cpu_kernels.stream_ahead(distances[0])
                step_ms, other_ms = (statistics.median(medians[d]) * 1e3 for d in distances)
                print(f"\n{dtype} {cpu_linear} batch {batch}: step {step_ms:.2f} ms with the build's weight prefetch "
                      f"{distances[0]} bytes ahead, {other_ms:.2f} ms at {distances[1]} (tok/s ratio build/other "
                      f"{other_ms / step_ms:.3f}, medians of {args.rounds} alternating rounds)", flush=True)
            else:
                step_ms = statistics.median(decode_steps(engine, batch, prompts, args.steps)) * 1e3
                finish(engine)
            if args.phases and stack == "on":
                print_phases(engine, batch, prompts, args.steps, step_ms, bandwidth, adapter)
            decode_steps(engine, batch, prompts, 2, adapter)  # same state again, under the profiler
            # the whole-stack call is a method of a C++ class, no operator: a labelled range makes it one (on its lean
            # path nothing inside is an operator; operator by operator, its operators are its children)
            def labelled_stack(*a, _stack=llama.try_fused_stack, **k):
                with torch.profiler.record_function(STACK_LABEL):
                    return _stack(*a, **k)
            llama.try_fused_stack = labelled_stack
            try:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        engine.step()
                    profiled_ms = (time.perf_counter() - t0) / args.steps * 1e3
            finally:
                llama.try_fused_stack = labelled_stack.__kwdefaults__["_stack"]
            finish(engine)
            events = prof.key_averages()
            calls = sum(e.count for e in events if "::" in e.key) / args.steps
            op_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
            stack_ms = sum(e.cpu_time_total for e in events if e.key == STACK_LABEL) / 1e3 / args.steps
            print(f"{'' if adapter else chr(10)}{dtype} {cpu_linear}{ {'off': ' (layers one by one)', 'per-op': ' (stack per operator)'}.get(stack, '')} batch {batch}: step {step_ms:.2f} ms ({batch / step_ms * 1e3:.1f} tok/s); weights read "
                  f"{nbytes / 1e6:.0f} MB -> bandwidth bound {bound_ms:.2f} ms ({100 * bound_ms / step_ms:.0f}% of the "
                  f"step; {nbytes / (step_ms / 1e3) / 1e9:.1f} GB/s achieved)", flush=True)
            print(f"  profiled ({profiled_ms:.2f} ms a step under the profiler): {calls:.0f} operator calls per step, "
                  f"{op_ms:.2f} ms inside operators and the whole-stack call (of which that call, every decoder "
                  f"layer: {stack_ms:.2f} ms), {profiled_ms - op_ms:.2f} ms outside them (Python, dispatch, the step "
                  f"loop)", flush=True)
            ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
            for e in ranked:
                print(f"    {e.key:42s} {e.count / args.steps:7.1f} calls/step {e.self_cpu_time_total / 1e3 / args.steps:7.3f} "
                      f"ms/step", flush=True)
        del engine


if __name__ == "__main__":
    main()
