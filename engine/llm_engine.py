"""LLMEngine: the synchronous step — schedule(), execute, update_from_output() — plus detokenization."""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex.engine.adapter_hook import AdapterHook, AdapterHookFactory
from loraplex.engine.background import BackgroundFactory, BackgroundWork
from loraplex.engine.core.config import CacheConfig, ModelConfig, SchedulerConfig
from loraplex.engine.core.kv_cache import KVCacheManager
from loraplex.engine.core.outputs import EngineStats, RequestOutput, TokenLogprob
from loraplex.engine.core.request import Request, RequestStatus, validate_prompt
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.scheduler import Scheduler
from loraplex.engine.core.spec_decode import SpeculativeConfig
from loraplex.engine.detokenizer import IncrementalDetokenizer, decode_token_text
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.hugepages import move_to_huge_pages, move_to_huge_pages_tensors
from loraplex.engine.kernels.cpu_linear import (
    BATCH_INVARIANT_ISA,
    ONEDNN_ISA_VARIABLE,
    can_prepack,
    cap_isa_for_batch_invariance,
    has_amx,
    prepack_linears,
    rows_are_batch_invariant,
)
from loraplex.engine.layers.greedy_head import ScreenedGreedyHead
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.quant import (
    BNB_METHODS,
    QuantConfig,
    module_weight_bytes,
    quantize_linears,
    use_quantized_kernels,
)
from loraplex.engine.quant.stream import use_stream_linears

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    """vLLM's 'auto': the checkpoint's dtype; on a CPU without bf16 support, float32; never fp16 on CPU."""
    name = {"half": "float16", "float": "float32"}.get(name, name)
    if name == "auto":
        name = model_config.torch_dtype if model_config.torch_dtype in ("bfloat16", "float16") else "float32"
        if device.type == "cpu":
            if name == "float16":
                name = "bfloat16"
            if name == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                name = "float32"
    return getattr(torch, name)


class LLMEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, model_config: ModelConfig,
                 max_model_len: int) -> None:
        self.adapter_hook: AdapterHook | None = None  # set by attach_adapter_hook
        self.background: BackgroundWork | None = None  # set by from_engine_args (the trainer)
        self.memory_bytes: dict[str, int] | None = None  # set by from_engine_args
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.eos_token_ids = self._eos_token_ids(tokenizer, model_config)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._requests: dict[str, Request] = {}
        self.structured_output = None  # StructuredOutputManager, made when the first request asks for one
        # requests of the engine process's own (the trainer's base-model answers): request id -> (text so far,
        # callback(text, finish_reason)); their outputs go to the callback, never to the server
        self._internal: dict[str, tuple[list[str], Callable[[str, str | None], None]]] = {}
        # multi-step decoding (--num-scheduler-steps) fits its steps into this window, the stream interval: a
        # request's tokens then come no more bunched, and an arrival waits no longer, than the coalesced stream's
        # (0: groups off, decode steps not timed)
        self.multi_step_window_s = 0.0
        self.decode_step_s: dict[int, float] = {}  # rows -> the time a decode step of that many takes (moving average)
        self.scheduler.multi_step_cap = self._multi_step_cap

    def _structured(self):
        if self.structured_output is None:
            from loraplex.engine.structured.manager import StructuredOutputManager
            self.structured_output = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size,
                                                             self.eos_token_ids)
            self.runner.structured_output = self.structured_output
        return self.structured_output

    @staticmethod
    def _eos_token_ids(tokenizer, model_config: ModelConfig) -> tuple[int, ...]:
        ids = list(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return tuple(ids)

    def attach_adapter_hook(self, hook: AdapterHook) -> None:
        """Wire the adapter layer in: it admits, releases and prepares every step's adapter rows."""
        self.adapter_hook = hook
        self.runner.adapter_hook = hook
        self.scheduler.admission_hook = hook.admit

    @classmethod
    def from_engine_args(cls, args: EngineArgs, hook_factory: AdapterHookFactory | None = None,
                         background_factory: BackgroundFactory | None = None) -> LLMEngine:
        from loraplex.engine.loader import load_model

        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        torch.manual_seed(args.seed)
        model_path = args.model
        if model_path is None:
            from loraplex.engine.default_model import ensure_default_model
            model_path = str(ensure_default_model(progress=logger.info))
        device = resolve_device(args.device)
        if args.batch_invariant and device.type == "cpu":
            cap_isa_for_batch_invariance()  # before this process's first oneDNN call, or it comes too late
        t0 = time.perf_counter()
        model_config = _read_model_config(model_path)
        dtype = resolve_dtype(args.dtype, model_config, device)
        model, model_config = load_model(model_path, dtype=dtype, device=device)
        quant = QuantConfig(args.quantization, double_quant=args.double_quant)
        if quant.method in BNB_METHODS:
            quantize_linears(model, quant, dtype, device)
        elif quant.method != "none" and getattr(model, "quant_method", "none") != quant.method:
            raise ValueError(f"--quantization {quant.method}: {model_path} is not a {quant.method.upper()} checkpoint")
        stream = choose_cpu_linear(args.cpu_linear, device, dtype, args.max_num_seqs)
        if stream is not None:
            streamed = use_stream_linears(model, dtype, dense=stream, act_int8=args.activation_quant == "int8")
            if streamed and dtype == torch.float32 and hasattr(model, "use_float32_kernels"):
                # parity with transformers is gone with streamed (or quantized) weights: take the fast paths
                model.use_float32_kernels()
                logger.info("float32 with streaming linears: fused elementwise kernels and one-call layers")
        use_quantized_kernels(model, device, dtype)
        if args.cpu_weight_prepack and can_prepack(device, dtype) and not stream:
            prepack_linears(model, batch_size_hint=args.max_num_seqs, keep_dense=args.enable_training,
                            batch_invariant=args.batch_invariant)
            if args.batch_invariant and dtype == torch.bfloat16 and has_amx():
                _log_amx_invariance(dtype)
        if args.cpu_huge_pages and device.type == "cpu":
            move_to_huge_pages(model)  # before anything builds kernel descriptions of the weights
        tokenizer = load_tokenizer(model_path)
        max_model_len = args.max_model_len or min(model_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the model's "
                             f"max_position_embeddings ({model_config.max_position_embeddings})")
        logger.info("loaded %s (%s, %d layers) as %s on %s in %.1fs", model_path, model_config.architecture,
                    model_config.num_hidden_layers, dtype, device, time.perf_counter() - t0)
        cache_config = CacheConfig(block_size=args.block_size, num_blocks=args.num_gpu_blocks_override,
                                   kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                                   enable_prefix_caching=args.enable_prefix_caching)
        kv_dtype = None
        if args.kv_cache_dtype == "bfloat16" and dtype != torch.bfloat16:
            if dtype != torch.float32:
                raise ValueError(f"--kv-cache-dtype bfloat16 takes a float32 or bfloat16 model, not {dtype}")
            kv_dtype = torch.bfloat16
        runner = ModelRunner(model, model_config, cache_config, device, dtype, max_model_len, kv_dtype)
        if args.cpu_huge_pages and device.type == "cpu":
            move_to_huge_pages_tensors([t for c in runner.kv_caches for t in (c.k, c.v)], "KV cache", zeros=True)
        if args.screened_greedy_head and ScreenedGreedyHead.supports(model.lm_head):
            runner.greedy_head = ScreenedGreedyHead(model.lm_head)
            if args.cpu_huge_pages:
                move_to_huge_pages_tensors([runner.greedy_head.screen.weight], "greedy head screening codes")
        scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens or max(1024, args.max_num_seqs),
            max_model_len=max_model_len, enable_chunked_prefill=args.enable_chunked_prefill,
            max_loras=args.max_loras, num_scheduler_steps=args.num_scheduler_steps)
        kv = KVCacheManager(runner.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        speculative = SpeculativeConfig.parse(args.speculative_config)
        if speculative is not None:
            logger.info("speculative decoding: prompt lookup, up to %d draft tokens from %d-%d-gram matches, for "
                        "greedy requests", speculative.num_speculative_tokens, speculative.prompt_lookup_min,
                        speculative.prompt_lookup_max)
        engine = cls(runner, Scheduler(scheduler_config, kv, speculative=speculative), tokenizer, model_config,
                     max_model_len)
        if speculative is not None or args.num_scheduler_steps == 1 or args.stream_interval_ms == 0:
            logger.info("multi-step decoding: off (one decode step per schedule)")
        else:
            engine.multi_step_window_s = args.stream_interval_ms / 1000
            logger.info("multi-step decoding: up to %d greedy decode steps per schedule, as many as fit %.0f ms",
                        args.num_scheduler_steps, args.stream_interval_ms)
        if hook_factory is not None:
            engine.attach_adapter_hook(hook_factory(engine, args))
        if background_factory is not None:
            engine.background = background_factory(engine, args)
        engine.memory_bytes = {"weights": module_weight_bytes(model), "kv_cache": runner.kv_cache_bytes,
                               "lora_pool": getattr(engine.adapter_hook, "pool_bytes", 0)}
        logger.info("memory: base weights %.1f MiB (%s), KV cache %.1f MiB, LoRA pool %.1f MiB",
                    engine.memory_bytes["weights"] / 2**20, quant.method if quant.method != "none" else str(dtype),
                    engine.memory_bytes["kv_cache"] / 2**20, engine.memory_bytes["lora_pool"] / 2**20)
        return engine

    # ---- requests -------------------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt_token_ids, params, self.max_model_len, self.model_config.vocab_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, adapter: tuple | None = None) -> Request:
        """`adapter`: (adapter_id, version) of a registered adapter, or (adapter_id, version, mix) where `mix` is what
        the adapter hook makes of it (adapters/composition.py); None is the base model."""
        self.validate_prompt(prompt_token_ids, params)
        adapter_id, adapter_version, *mix = adapter or (0, 0)
        if adapter_id and self.adapter_hook is None:
            raise ValueError("this engine serves no adapters (start it with LoRA enabled)")
        request = Request(request_id, prompt_token_ids, params, eos_token_ids=self.eos_token_ids,
                          arrival_time=arrival_time, adapter_id=adapter_id, adapter_version=adapter_version,
                          adapter_mix=mix[0] if mix else None)
        if params.structured_output is not None:
            self._structured().submit(request)  # compiles off the loop; the scheduler waits for it
        if self.adapter_hook is not None:
            self.adapter_hook.add_request(request)
        try:
            self.scheduler.add_request(request)
        except ValueError:
            if self.adapter_hook is not None:
                self.adapter_hook.release(request, finished=True)
            if self.structured_output is not None:
                self.structured_output.release(request_id)
            raise
        self._requests[request_id] = request
        self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        return request

    def add_internal_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                             on_finish: Callable[[str, str | None], None]) -> None:
        """A base-model request of the engine's own (no client): it runs in the same batches as the served
        requests, and `on_finish(text, finish_reason)` gets its whole output instead of the server."""
        self.add_request(request_id, prompt_token_ids, params)
        self._internal[request_id] = ([], on_finish)

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        ids = [r for r in request_ids if r in self._requests]
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
        return [self._final_output(self._requests[r], "", [], None) for r in ids]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> EngineStats:
        kv = self.scheduler.kv_cache_manager
        adapters = None
        if self.adapter_hook is not None:
            adapters = self.adapter_hook.stats()
            # the adapters of running and waiting requests, by name (the Gateway API Inference Extension's
            # LoRA info metric; an endpoint picker routes on it)
            names = getattr(self.adapter_hook, "adapter_name", lambda key: None)
            queues = (("running_names", self.scheduler.running), ("waiting_names", self.scheduler.waiting))
            for kind, requests in queues:
                keys = {(r.adapter_id, r.adapter_version) for r in requests if r.adapter_id}
                adapters[kind] = sorted({n for n in map(names, keys) if n})
            adapters["max_loras"] = self.scheduler.scheduler_config.max_loras
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.num_total_blocks,
                           adapters=adapters, memory_bytes=self.memory_bytes,
                           spec_draft_tokens=self.scheduler.num_draft_tokens,
                           spec_accepted_tokens=self.scheduler.num_accepted_tokens)

    def call(self, method: str, args: tuple):
        """A control call between steps: train_* go to the background work (the trainer), the rest to the
        adapter hook."""
        if method.startswith("train_"):
            if self.background is None:
                raise ValueError("this engine runs no trainer (start it with training enabled)")
            return self.background.call(method, args)
        return self.call_adapter_hook(method, args)

    def call_adapter_hook(self, method: str, args: tuple):
        if self.adapter_hook is None:
            raise ValueError("this engine serves no adapters (start it with LoRA enabled)")
        return self.adapter_hook.call(method, args)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._poll_grammars() + self._poll_adapters()
        scheduler_output = self.scheduler.schedule()
        if self.adapter_hook is not None:
            for request_id in scheduler_output.preempted_request_ids:
                self.adapter_hook.release(self._requests[request_id], finished=False)
        if not scheduler_output.scheduled:
            return outputs
        timed = self.multi_step_window_s > 0 and all(s.num_new_tokens == 1 for s in scheduler_output.scheduled)
        started = time.perf_counter()
        sampled = self.runner.execute(scheduler_output)
        if timed:  # a decode-only step: it sizes the groups
            self._time_decode_step(time.perf_counter() - started, sampled)
        grammar_done = []
        for rid, s in sampled.items():
            if s.prompt_logprobs:
                self._requests[rid].prompt_logprobs.extend(s.prompt_logprobs)
            if s.token_id is not None and self.structured_output is not None:
                request = self._requests[rid]
                if not self.structured_output.accept(request, s.token_id):
                    logger.warning("request %s: the grammar refused sampled token %d; finishing it", rid, s.token_id)
                    grammar_done.append(rid)
                elif self.structured_output.is_terminated(request):
                    grammar_done.append(rid)
        updates = self.scheduler.update_from_output(
            scheduler_output, {rid: s.token_ids if s.token_ids is not None else s.token_id
                               for rid, s in sampled.items() if s.token_id is not None})
        # a complete structured output ends the request even if its stop token was not sampled (ignore_eos)
        self.scheduler.finish_requests([rid for rid in grammar_done if not self._requests[rid].is_finished],
                                       RequestStatus.FINISHED_STOPPED)
        for request, new_token_ids in updates:
            outputs.append(self._make_output(request, new_token_ids, sampled.get(request.request_id)))
        return self._route_internal(outputs) if self._internal else outputs

    def _time_decode_step(self, elapsed_s: float, sampled: dict) -> None:
        """Fold a decode-only step's time (per step, for a multi-step) into decode_step_s for its number of rows."""
        if not sampled:
            return
        steps = max(len(s.token_ids) if s.token_ids else 1 for s in sampled.values())
        per_step = elapsed_s / steps
        old = self.decode_step_s.get(len(sampled))
        self.decode_step_s[len(sampled)] = per_step if old is None else 0.7 * old + 0.3 * per_step

    def _multi_step_cap(self, rows: int) -> int:
        """The decode steps of `rows` rows that fit multi_step_window_s; 1 until such a step was timed."""
        per_step = self.decode_step_s.get(rows)
        return 1 if per_step is None else max(1, int(self.multi_step_window_s / per_step))

    def _route_internal(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        kept = []
        for out in outputs:
            internal = self._internal.get(out.request_id)
            if internal is None:
                kept.append(out)
                continue
            internal[0].append(out.text)
            if out.finished:
                del self._internal[out.request_id]
                internal[1]("".join(internal[0]), out.finish_reason)
        return kept

    def _poll_grammars(self) -> list[RequestOutput]:
        """Admit requests whose grammar compiled since the last step; with nothing else to run, wait a little for
        one instead of spinning. A grammar that fails to compile aborts its request."""
        manager = self.structured_output
        if manager is None or not manager.has_pending:
            return []
        idle = not self.scheduler.running and all(r.is_waiting_off_loop for r in self.scheduler.waiting)
        outputs = []
        for request, error in manager.poll(wait_s=0.05 if idle else 0.0):
            logger.error("request %s: %s", request.request_id, error)
            outputs.extend(self.abort_requests([request.request_id]))
        return outputs

    def _poll_adapters(self) -> list[RequestOutput]:
        """Admit requests whose adapter got ready off the loop (a merged adapter); one that failed aborts."""
        hook = self.adapter_hook
        if hook is None or not hook.has_pending:
            return []
        idle = not self.scheduler.running and all(r.is_waiting_off_loop for r in self.scheduler.waiting)
        outputs = []
        for request_id, error in hook.poll(wait_s=0.05 if idle else 0.0):
            logger.error("request %s: %s", request_id, error)
            outputs.extend(self.abort_requests([request_id]))
        return outputs

    def _make_output(self, request: Request, new_token_ids: list[int], sampled) -> RequestOutput:
        detok = self._detokenizers[request.request_id]
        if len(new_token_ids) > 1:  # accepted draft tokens: a stop string ends the output at its own token
            text = ""
            for i, token_id in enumerate(new_token_ids):
                text += detok.update([token_id])
                if detok.stopped:
                    extra = len(new_token_ids) - i - 1
                    if extra:
                        del request.output_token_ids[-extra:]
                        new_token_ids = new_token_ids[:i + 1]
                    break
        else:
            text = detok.update(new_token_ids) if new_token_ids else ""
        if detok.stopped and not request.is_finished:
            self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
            request.stop_reason = detok.stop_reason
        logprobs = None
        if sampled is not None and sampled.logprobs is not None and new_token_ids:
            (tok, lp), *top = sampled.logprobs
            logprobs = [TokenLogprob(tok, decode_token_text(self.tokenizer, tok), lp,
                                     [(t, decode_token_text(self.tokenizer, t), v) for t, v in top])]
        prompt_logprobs = self._prompt_logprobs(request) if request.num_output_tokens == len(new_token_ids) else None
        if request.is_finished:
            if not detok.stopped:
                text += detok.flush()
            out = self._final_output(request, text, new_token_ids, logprobs)
        else:
            out = RequestOutput(request.request_id, text, new_token_ids, False, request.num_prompt_tokens,
                                request.num_output_tokens, logprobs)
        out.prompt_logprobs = prompt_logprobs
        return out

    def _prompt_logprobs(self, request: Request) -> list[TokenLogprob] | None:
        """The request's prompt logprobs as output data (its first output carries them)."""
        if request.prompt_logprobs is None:
            return None
        text = functools.partial(decode_token_text, self.tokenizer)
        return [TokenLogprob(p.token_id, text(p.token_id), p.logprob, [(t, text(t), v) for t, v in p.top], p.rank)
                for p in request.prompt_logprobs]

    def _final_output(self, request: Request, text: str, new_token_ids: list[int], logprobs) -> RequestOutput:
        if self.adapter_hook is not None and request.request_id in self._requests:
            self.adapter_hook.release(request, finished=True)
        if self.structured_output is not None:
            self.structured_output.release(request.request_id)
        self._requests.pop(request.request_id, None)
        self._detokenizers.pop(request.request_id, None)
        return RequestOutput(request.request_id, text, new_token_ids, True, request.num_prompt_tokens,
                             request.num_output_tokens, logprobs, request.status.finish_reason,
                             request.stop_reason)


PLAIN_FAST_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")  # what AutoTokenizer resolves them to


def load_tokenizer(model_path: str):
    """The tokenizer (with its chat template) of a model folder, or of a .gguf file's metadata. A folder whose
    tokenizer_config.json names the plain fast tokenizer (with its tokenizer.json) is read by that class directly:
    the same tokenizer AutoTokenizer makes, without the model config AutoTokenizer reads first, whose import pulls in
    half of transformers and torch.distributed (~1-2 s of every server and engine start; importing AutoTokenizer
    alone is ~1.2 s of it, so only the other paths do)."""
    if os.path.isdir(model_path) and _names_plain_fast_tokenizer(Path(model_path)):
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(model_path)
    from transformers import AutoTokenizer
    if os.path.isdir(model_path):
        return AutoTokenizer.from_pretrained(model_path)
    return AutoTokenizer.from_pretrained(str(Path(model_path).parent), gguf_file=Path(model_path).name)


def _names_plain_fast_tokenizer(folder: Path) -> bool:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and config.get("tokenizer_class") in PLAIN_FAST_TOKENIZERS
            and (folder / "tokenizer.json").is_file())


STREAM_MAX_NUM_SEQS = 16  # 'auto' streams float32 weights for deployments batching at most this many sequences


def choose_cpu_linear(choice: str, device: torch.device, dtype: torch.dtype, max_num_seqs: int = 64) -> bool | None:
    """Which CPU base linears to use: None (not CPU, the kernels cannot load, or 'onednn': oneDNN for dense weights,
    torch's int4 kernel or the plain-torch references for GPTQ ones), False (stream the GPTQ 8/4-bit linears; dense
    ones go to oneDNN), True (stream dense ones too).

    'auto' streams dense bfloat16 always: where oneDNN has no native bfloat16 kernel, torch's fallback is 2-5x slower
    at every batch size; where it has (an AVX-512 BF16 machine), streaming is 2.3x faster at batch 1, about even at
    4-8 rows and 1.2-1.25x slower from 16, and 64 x 64 serving still leads llama.cpp's (543 vs 431 tok/s; oneDNN
    618): the first request a user sends is worth more than the last 12% of a full batch.
    Dense float32 when the engine batches at most STREAM_MAX_NUM_SEQS sequences: streaming reads the weights at close
    to the memory bandwidth (batch-1 decode ~1.5x faster than oneDNN here) but its GEMM is ~1.3x slower from ~32 rows
    on (prefill, 64-way decode). Batch invariance needs one kernel for every row, so the choice
    is per process, not per step (scripts/bench/profile_decode.py shows both)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    from loraplex.engine.kernels import cpu_kernels
    if not cpu_kernels.available():
        return None
    if choice == "onednn":
        return None
    if choice == "stream":
        return True
    if dtype == torch.bfloat16:
        return True
    return max_num_seqs <= STREAM_MAX_NUM_SEQS


def _read_model_config(model_path: str) -> ModelConfig:
    import json
    if os.path.isdir(model_path):
        with open(Path(model_path) / "config.json") as f:
            return ModelConfig.from_hf_dict(json.load(f))
    from loraplex.engine.weights import gguf_hf_config
    return ModelConfig.from_hf_dict(gguf_hf_config(model_path))


def _log_amx_invariance(dtype: torch.dtype) -> None:
    if rows_are_batch_invariant(dtype):
        logger.info("batch invariance on this AMX CPU: oneDNN runs its %s kernels, not AMX (%s=%s); "
                    "--no-batch-invariant keeps AMX, for up to ~3x the batched bf16 throughput",
                    BATCH_INVARIANT_ISA, ONEDNN_ISA_VARIABLE, os.environ.get(ONEDNN_ISA_VARIABLE))
    else:
        logger.warning("greedy outputs may depend on the batch: this CPU's AMX kernels round rows by their batch, "
                       "and oneDNN was already in use when the engine tried to cap it; start the process with "
                       "%s=%s for exact batch invariance", ONEDNN_ISA_VARIABLE, BATCH_INVARIANT_ISA)
