"""EngineArgs: the user-facing engine knobs (vLLM spellings), turned into frozen configs."""
from __future__ import annotations

import re
from dataclasses import dataclass

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
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_queue_len: int = 256  # waiting requests beyond this get 429
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU; None: all cores
    cpu_weight_prepack: bool = True  # CPU: swap nn.Linear for oneDNN-prepacked PackedLinear
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
    # training beside serving (used by the background work the server wires in: loraplex.trainer.service)
    enable_training: bool = False  # the base linears keep what a backward pass needs (CPU prepack: dense weights)
    train_share: float = 0.25  # largest share of the loop's busy time training takes while requests wait
    max_train_jobs: int = 4  # jobs batched into one training step
    train_gradient_checkpointing: bool = False
    train_chunk_tokens: int = 1024  # tokens per training slice (a layer of a chunk): bounds how long decode waits
    fine_tuning_dir: str | None = None  # the fine-tuning job store (files, jobs, checkpoints)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
            raise ValueError(f"--dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("--max-model-len must be at least 2")
        if self.max_num_seqs < 1:
            raise ValueError("--max-num-seqs must be at least 1")
        if self.max_queue_len < 1:
            raise ValueError("--max-queue-len must be at least 1")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError("--kv-cache-memory-bytes must be positive")
        if self.quantization not in ("none", "nf4", "int8", "gptq", "exl2"):
            raise ValueError(f"--quantization must be one of none, nf4, int8, gptq, exl2; got {self.quantization!r}")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("--max-loras and --max-lora-rank must be at least 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ValueError("--max-cpu-loras must be at least 1")
        if self.lora_pool_pages is not None and self.lora_pool_pages <= self.max_lora_rank:
            raise ValueError(f"--lora-pool-pages must exceed --max-lora-rank ({self.max_lora_rank}): "
                             "the pool must hold at least one adapter of the largest rank")
        if self.lora_pool_bytes <= 0:
            raise ValueError("--lora-pool-bytes must be positive")
        if not 0.0 <= self.train_share <= 1.0:
            raise ValueError(f"--train-share must be in [0, 1]; got {self.train_share}")
        if self.max_train_jobs < 1:
            raise ValueError("--max-train-jobs must be at least 1")
        if self.train_chunk_tokens < 1:
            raise ValueError("--train-chunk-tokens must be at least 1")
