"""EngineArgs: the user-facing engine knobs (vLLM spellings), turned into frozen configs, and the command-line
flags that set them (`add_engine_args`, `engine_args_from`), shared by `loraplex serve` and `loraplex bench offline`."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

from loraplex.engine.paths import default_fine_tuning_dir

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size_bytes(text: str | int) -> int:
    """'4GiB', '512M', '1.5g' or a plain integer -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read a size from {text!r}; use e.g. 2GiB, 512MiB or a byte count")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True, slots=True)
class EngineArgs:
    model: str | None = None  # HF-layout folder or .gguf file; None: the default model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # None: min(model's max positions, 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: max(1024, max_num_seqs)
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | bfloat16 (float32 models: half the cache bytes)
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_queue_len: int = 256  # waiting requests beyond this get 429
    stream_interval_ms: float = 20.0  # a request's deltas go out at most this often (engine_core.OutputCoalescer)
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU; None: all cores
    cpu_weight_prepack: bool = True  # CPU: swap nn.Linear for oneDNN-prepacked PackedLinear
    num_scheduler_steps: int = 8  # greedy decode steps per schedule, within the stream interval (--num-scheduler-steps)
    speculative_config: str | dict | None = None  # vLLM's spelling: {"method": "ngram", "num_speculative_tokens": K, ...}
    cpu_linear: str = "auto"  # CPU base linears: auto | stream (weight-streaming kernel) | onednn (see llm_engine)
    cpu_huge_pages: bool = True  # CPU: weights and KV cache on transparent huge pages (engine/hugepages.py)
    activation_quant: str = "int8"  # streamed 8/4-bit weights: int8 (integer dot products) | none (exact weight-only)
    screened_greedy_head: bool = True  # CPU streaming head: plain-greedy steps screen an 8-bit copy (engine/layers/greedy_head.py)
    batch_invariant: bool = True  # CPU prepack: a request's greedy output never depends on its batch (~10% batch-1)
    quantization: str = "none"  # none | nf4 | int8 (bitsandbytes, at load) | gptq | exl2 (from the checkpoint)
    double_quant: bool = True  # nf4: QLoRA's double quantization of the absmax statistics
    # LoRA (used by the adapter hook the server wires in; vLLM's spellings)
    enable_lora: bool = False
    max_loras: int = 32  # distinct adapters in one step
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None  # adapters kept in the host-memory tier; None: sized from the pool
    lora_pool_pages: int | None = None  # pool size in pages (one rank-row of every target linear)
    lora_pool_bytes: int = 256 << 20  # pool size in bytes when lora_pool_pages is None
    max_mixlora_adapters: int = 16  # MixLoRA adapters resident at once (router slots)
    max_full_module_adapters: int = 2  # adapters with their own embed_tokens / lm_head resident at once
    max_mixlora_experts: int = 16  # experts per MixLoRA adapter
    # training beside serving (used by the background work the server wires in: loraplex.trainer.service)
    enable_training: bool = False  # the base linears keep what a backward pass needs (CPU prepack: dense weights)
    train_share: float = 0.25  # largest share of the loop's busy time training takes while requests wait
    max_train_jobs: int = 4  # jobs batched into one training step
    train_gradient_checkpointing: bool = False
    train_chunk_tokens: int = 1024  # tokens per training slice (a layer of a chunk): bounds how long decode waits
    # memory the trainer's per-job state (LoRA weights, gradients, AdamW moments) may take; None: what the
    # device has free when a job starts, less a reserve (trainer/service.py's admission)
    train_memory_bytes: int | None = None
    train_lease_s: float = 30.0  # a trainer holds its jobs for this long past its last renewal (shared stores)
    fine_tuning_dir: str | None = None  # the fine-tuning job store (files, jobs, checkpoints)
    database: str | None = None  # --database: the stores' metadata (None: SQLite files under their folders)
    blob_store: str | None = None  # --blob-store: the stores' files (None: their folders)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
            raise ValueError(f"--dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("--max-model-len must be at least 2")
        if self.max_num_seqs < 1:
            raise ValueError("--max-num-seqs must be at least 1")
        if self.max_queue_len < 1:
            raise ValueError("--max-queue-len must be at least 1")
        if not 0 <= self.stream_interval_ms <= 1000:
            raise ValueError(f"--stream-interval-ms must be in [0, 1000]; got {self.stream_interval_ms}")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError("--kv-cache-memory-bytes must be positive")
        if self.kv_cache_dtype not in ("auto", "bfloat16"):
            raise ValueError(f"--kv-cache-dtype must be auto or bfloat16; got {self.kv_cache_dtype!r}")
        if self.quantization not in ("none", "nf4", "int8", "gptq", "exl2"):
            raise ValueError(f"--quantization must be one of none, nf4, int8, gptq, exl2; got {self.quantization!r}")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("--max-loras and --max-lora-rank must be at least 1")
        if self.cpu_linear not in ("auto", "stream", "onednn"):
            raise ValueError(f"--cpu-linear must be one of auto, stream, onednn; got {self.cpu_linear!r}")
        if self.activation_quant not in ("int8", "none"):
            raise ValueError(f"--activation-quant must be int8 or none; got {self.activation_quant!r}")
        if not 1 <= self.num_scheduler_steps <= 64:
            raise ValueError(f"--num-scheduler-steps must be in [1, 64]; got {self.num_scheduler_steps}")
        if self.speculative_config is not None:
            from loraplex.engine.core.spec_decode import SpeculativeConfig
            try:
                SpeculativeConfig.parse(self.speculative_config)
            except (TypeError, ValueError) as exc:  # bad JSON, wrong types, out of range
                raise ValueError(f"--speculative-config: {exc}") from exc
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ValueError("--max-cpu-loras must be at least 1")
        if self.lora_pool_pages is not None and self.lora_pool_pages <= self.max_lora_rank:
            raise ValueError(f"--lora-pool-pages must exceed --max-lora-rank ({self.max_lora_rank}): "
                             "the pool must hold at least one adapter of the largest rank")
        if not 0 <= self.max_full_module_adapters <= 256:
            raise ValueError("--max-full-module-adapters must be in [0, 256]")
        if not 1 <= self.max_mixlora_adapters <= 4096 or not 1 <= self.max_mixlora_experts <= 64:
            raise ValueError("--max-mixlora-adapters must be in [1, 4096] and --max-mixlora-experts in [1, 64]")
        if self.lora_pool_bytes <= 0:
            raise ValueError("--lora-pool-bytes must be positive")
        if not 0.0 <= self.train_share <= 1.0:
            raise ValueError(f"--train-share must be in [0, 1]; got {self.train_share}")
        if self.max_train_jobs < 1:
            raise ValueError("--max-train-jobs must be at least 1")
        if self.train_chunk_tokens < 1:
            raise ValueError("--train-chunk-tokens must be at least 1")
        if not 1.0 <= self.train_lease_s <= 3600.0:
            raise ValueError(f"--train-lease must be between 1 and 3600 seconds; got {self.train_lease_s}")


def size_arg(text: str) -> int:
    """argparse type for sizes ('2GiB', '512MiB', a byte count)."""
    try:
        return parse_size_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_engine_args(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """The engine's flags on `p`. Returns the "lora" and "fine_tuning" argument groups, so a command adds its own
    flags of those topics beside them in --help."""
    p.add_argument("--model", default=None,
                   help="Hugging Face-layout folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--quantization", "-q", default="none", choices=["none", "nf4", "int8", "gptq", "exl2"],
                   help="base weights: nf4/int8 quantize at load (bitsandbytes); gptq/exl2 name the checkpoint's format")
    p.add_argument("--kv-cache-memory-bytes", type=size_arg, default=1 << 30, metavar="SIZE",
                   help="KV cache size, e.g. 2GiB or 512MiB (default: 1GiB)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16"], default="auto",
                   help="auto: the model's dtype; bfloat16: a float32 model (a quantized one computing in float32) "
                        "keeps keys and values in bfloat16, half the bytes a decode step reads from its cache and "
                        "twice the tokens in --kv-cache-memory-bytes (llama.cpp's default is an f16 cache); "
                        "attention then runs in bfloat16")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: a request's greedy output is exactly the same alone or in any batch "
                        "(--no-batch-invariant: ~10%% faster batch-1 decode; on an AMX CPU it also keeps oneDNN off AMX, "
                        "so --no-batch-invariant there gives up to ~3x the batched bf16 throughput)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='prompt-lookup speculative decoding for greedy requests, as vLLM spells it: '
                        '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
                        '"prompt_lookup_min": 2}\' (outputs are token for token those of plain greedy decoding)')
    p.add_argument("--num-scheduler-steps", type=int, default=8, metavar="N",
                   help="while every running request decodes by greedy argmax alone and none waits, run up to N "
                        "decode steps per schedule, each fed the tokens of the one before (vLLM's multi-step "
                        "scheduling): the same tokens, with a step's Python, scheduling and output work once per "
                        "group. As many steps as fit --stream-interval-ms, so tokens come no more bunched, and a new "
                        "request waits no longer, than the coalesced stream's; 1 or --stream-interval-ms 0: off; "
                        "off with --speculative-config (drafts at every token instead) (default: 8)")
    p.add_argument("--cpu-linear", choices=["auto", "stream", "onednn"], default="auto",
                   help="CPU base linears: 'stream' reads each weight once per step at close to the memory bandwidth "
                        "(lowest batch-1 latency), 'onednn' prepacks for oneDNN (faster from ~32 rows: prefill, wide "
                        "batches; GPTQ weights then take torch's int4 kernel or the reference). auto: GPTQ 8/4-bit and bfloat16 stream; float32 "
                        "streams with --max-num-seqs <= 16, oneDNN otherwise")
    p.add_argument("--cpu-huge-pages", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: keep the weights and the KV cache on transparent huge pages where the kernel offers them "
                        "(madvise or always: batch-1 decode 5-10%% faster here, the weights streaming 2 MiB a page)")
    p.add_argument("--activation-quant", choices=["int8", "none"], default="int8",
                   help="streamed 8/4-bit (GPTQ) weights on CPU: 'int8' rounds each row of activations to int8 per "
                        "32 channels and multiplies with integer dot products, as llama.cpp does (~3x faster "
                        "decode, <2%% perplexity); 'none' keeps exact weight-only products in float32")
    p.add_argument("--screened-greedy-head", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU, streaming float32/bfloat16 head: steps whose rows are all plain greedy find the argmax "
                        "through an 8-bit copy of the head and compute only the rows that can still win exactly "
                        "(the same tokens; the head 1.3-5x faster at 1-256 rows, for a quarter of its float32 bytes "
                        "more memory)")
    p.add_argument("--max-queue-len", type=int, default=256,
                   help="waiting requests beyond this get 429 with Retry-After")
    p.add_argument("--stream-interval-ms", type=float, default=20.0,
                   help="send each request's new tokens at most this often: a few per event when steps are faster "
                        "(the first and the last at once; the tokens and the time per token are unchanged, the "
                        "server's CPU per token falls 2-3x); 0: every step's tokens on their own (default: 20)")
    p.add_argument("--seed", type=int, default=0)
    lora = p.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=True,
                      help="serve LoRA adapters from a paged pool (default: on)")
    lora.add_argument("--max-loras", type=int, default=32, help="distinct adapters in one batch")
    lora.add_argument("--max-lora-rank", type=int, default=64)
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept in the host-memory tier (default: sized from the pool)")
    lora.add_argument("--lora-pool-pages", type=int, default=None,
                      help="pool size in pages (one page = one rank-row of every target linear)")
    lora.add_argument("--lora-pool-bytes", type=size_arg, default=256 << 20, metavar="SIZE",
                      help="pool size when --lora-pool-pages is not given (default: 256MiB)")
    lora.add_argument("--max-full-module-adapters", type=int, default=2, metavar="N",
                      help="adapters with their own embed_tokens / lm_head (modules_to_save, LoRA on them) held on the "
                           "device at once: whole [vocab, hidden] matrices, allocated on first use (default: 2)")
    lora.add_argument("--max-mixlora-adapters", type=int, default=16,
                      help="MixLoRA adapters resident in the pool at once: each takes a router slot of "
                           "layers x experts x hidden float32 weights, allocated on the first MixLoRA (default: 16)")
    lora.add_argument("--max-mixlora-experts", type=int, default=16,
                      help="largest num_experts of a MixLoRA adapter this server takes (default: 16)")
    storage = p.add_argument_group("storage (adapters and fine-tuning jobs; storage/)")
    storage.add_argument("--database", default=os.environ.get("LORAPLEX_DATABASE") or None, metavar="URL",
                         help="where adapter versions, fine-tuning files' records, jobs, events and checkpoints are "
                              "recorded: sqlite:///path or postgresql://user@host:port/db (several servers share "
                              "one; the password from PGPASSWORD or ~/.pgpass keeps it off the command line); "
                              "also env LORAPLEX_DATABASE; default: SQLite files in --adapter-dir and "
                              "--fine-tuning-dir")
    storage.add_argument("--blob-store", default=os.environ.get("LORAPLEX_BLOB_STORE") or None, metavar="URL",
                         help="where adapter files and uploaded training files are kept: file:///path or "
                              "s3://bucket/prefix (AWS_ENDPOINT_URL for MinIO, SeaweedFS...); also env "
                              "LORAPLEX_BLOB_STORE; default: the --adapter-dir and --fine-tuning-dir folders")
    ft = p.add_argument_group("fine-tuning (OpenAI's /v1/files and /v1/fine_tuning/jobs; needs LoRA)")
    ft.add_argument("--fine-tuning-dir", default=None,
                    help="the fine-tuning job store (SQLite + uploaded files + checkpoints; "
                         "default: ~/.cache/loraplex/fine_tuning)")
    ft.add_argument("--enable-training", action=argparse.BooleanOptionalAction, default=True,
                    help="train fine-tuning jobs in this process beside live traffic (default: on with LoRA; on "
                         "CPU the base linears then keep a dense copy of their weights for the backward pass)")
    ft.add_argument("--train-share", type=float, default=0.25,
                    help="largest share of the engine loop's time training takes while requests are running or "
                         "waiting; all of it when idle (default: 0.25)")
    ft.add_argument("--max-train-jobs", type=int, default=4, help="jobs batched into one training step (default: 4)")
    ft.add_argument("--train-gradient-checkpointing", action="store_true",
                    help="recompute activations in the backward pass (less memory, ~30%% more compute)")
    ft.add_argument("--train-chunk-tokens", type=int, default=1024,
                    help="a training step runs in slices (one decoder layer of a chunk of about this many tokens) "
                         "with inference steps in between: smaller keeps decode latency lower (default: 1024)")
    ft.add_argument("--train-memory", type=size_arg, default=None, metavar="SIZE",
                    help="memory for the running jobs' own state (LoRA weights, gradients, AdamW moments); a job "
                         "that does not fit waits, queued, until one ends (default: the device's free memory "
                         "less a reserve, when each job starts)")
    ft.add_argument("--train-lease", type=float, default=30.0, metavar="SECONDS",
                    help="with a store shared by several servers: a server that dies mid-job loses it to another "
                         "after this long without renewing its lease; the other resumes it from its last "
                         "checkpoint (default: 30)")
    return {"lora": lora, "fine_tuning": ft, "storage": storage}


def fine_tuning_dir_from(ns: argparse.Namespace) -> Path:
    """The one job store both processes open: --fine-tuning-dir, else the default."""
    return Path(ns.fine_tuning_dir).expanduser() if ns.fine_tuning_dir else default_fine_tuning_dir()


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """EngineArgs from the flags `add_engine_args` defined (raises ValueError on a bad combination)."""
    return EngineArgs(
        model=ns.model, dtype=ns.dtype, device=ns.device, max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        block_size=ns.block_size, kv_cache_memory_bytes=ns.kv_cache_memory_bytes, kv_cache_dtype=ns.kv_cache_dtype,
        quantization=ns.quantization,
        enable_prefix_caching=ns.enable_prefix_caching, max_queue_len=ns.max_queue_len, seed=ns.seed,
        stream_interval_ms=ns.stream_interval_ms,
        batch_invariant=ns.batch_invariant, cpu_linear=ns.cpu_linear, cpu_huge_pages=ns.cpu_huge_pages,
        activation_quant=ns.activation_quant, screened_greedy_head=ns.screened_greedy_head,
        speculative_config=ns.speculative_config, num_scheduler_steps=ns.num_scheduler_steps,
        enable_lora=ns.enable_lora, max_loras=ns.max_loras, max_lora_rank=ns.max_lora_rank,
        max_cpu_loras=ns.max_cpu_loras, lora_pool_pages=ns.lora_pool_pages, lora_pool_bytes=ns.lora_pool_bytes,
        max_mixlora_adapters=ns.max_mixlora_adapters, max_mixlora_experts=ns.max_mixlora_experts,
        max_full_module_adapters=ns.max_full_module_adapters,
        # the engine side's TrainingRuntime opens the same job store as the HTTP process's FineTuningService
        enable_training=ns.enable_lora and ns.enable_training, fine_tuning_dir=str(fine_tuning_dir_from(ns)),
        database=ns.database, blob_store=ns.blob_store,
        train_share=ns.train_share, max_train_jobs=ns.max_train_jobs,
        train_gradient_checkpointing=ns.train_gradient_checkpointing, train_chunk_tokens=ns.train_chunk_tokens,
        train_memory_bytes=ns.train_memory, train_lease_s=ns.train_lease)


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    """`--lora-modules NAME=PATH ...` -> {name: path} (no torch here: the server checks it before it starts the
    engine process)."""
    modules = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH, got {item!r}")
        modules[name] = path
    return modules
