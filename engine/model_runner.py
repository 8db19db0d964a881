"""ModelRunner: turns a SchedulerOutput into a ForwardBatch, runs the model, samples (one host sync)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loraplex.engine.core.config import CacheConfig, ModelConfig
from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.attention import allocate_kv_caches, build_forward_batch
from loraplex.engine.layers.forward_batch import ForwardBatch
from loraplex.engine.layers.sampler import Sampler, SamplingMetadata

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SampledToken:
    token_id: int
    # (token_id, logprob) pairs: the sampled token first, then the top alternatives
    logprobs: list[tuple[int, float]] | None = None


def kv_cache_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    # K and V, every layer: [block_size, num_kv_heads, head_dim]
    return 2 * model_config.num_hidden_layers * block_size * model_config.num_key_value_heads \
        * model_config.head_dim * elem


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler on one device."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 device: torch.device, dtype: torch.dtype, max_model_len: int) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = cache_config.block_size
        self.max_model_len = max_model_len
        per_block = kv_cache_bytes_per_block(model_config, self.block_size, dtype)
        self.num_blocks = cache_config.num_blocks or max(1, cache_config.kv_cache_memory_bytes // per_block)
        self.kv_caches = allocate_kv_caches(model_config.num_hidden_layers, self.num_blocks * self.block_size,
                                            model_config.num_key_value_heads, model_config.head_dim,
                                            dtype, device)
        self.kv_cache_bytes = self.num_blocks * per_block
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB, %s on %s)", self.num_blocks,
                    self.block_size, self.num_blocks * per_block / 2**20, dtype, device)
        # the fused CPU attention kernel (built once per machine); the plain-torch path otherwise
        self.cpu_attention_kernel = (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                                     and cpu_kernels.available())
        logger.info("attention: %s", "fused CPU kernel" if self.cpu_attention_kernel else "plain torch")
        self.sampler = Sampler()
        self.adapter_hook = None  # AdapterHook: sets each step's per-row adapter metadata

    # ---- batch building -------------------------------------------------------------------
    def build_batch(self, scheduled) -> ForwardBatch:
        """`scheduled`: the scheduler's list, single-token entries first (the decode group)."""
        input_ids: list[int] = []
        logits_rows: list[int] = []
        row = 0
        for s in scheduled:
            input_ids.extend(_tokens_between(s.request, s.start_pos, s.start_pos + s.num_new_tokens))
            row += s.num_new_tokens
            if s.sample:
                logits_rows.append(row - 1)
        return build_forward_batch(
            input_ids, [s.num_new_tokens for s in scheduled], [s.start_pos for s in scheduled],
            [s.block_ids for s in scheduled], self.block_size, self.device, logits_indices=logits_rows,
            sliding_window=self.model_config.sliding_window, cpu_kernel=self.cpu_attention_kernel)

    # ---- execution ------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduler_output) -> dict[str, SampledToken]:
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return {}
        batch = self.build_batch(scheduled)
        if self.adapter_hook is not None:
            self.adapter_hook.prepare(scheduled, batch)
        hidden = self.model(batch, self.kv_caches)  # [num_tokens, hidden]
        sampling = [s for s in scheduled if s.sample]  # same order as logits_indices
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [num_sampled, vocab]
        requests = [s.request for s in sampling]
        metadata = SamplingMetadata.build(requests, logits.shape[-1], self.device)
        out = self.sampler(logits, metadata)
        token_ids = out.sampled_token_ids.tolist()  # the step's one host sync
        result: dict[str, SampledToken] = {}
        if out.logprobs is not None:
            lp_ids, lps = out.logprob_token_ids.tolist(), out.logprobs.tolist()
        for i, req in enumerate(requests):
            lp = None
            if out.logprobs is not None and req.sampling_params.logprobs is not None:
                k = req.sampling_params.logprobs + 1
                lp = list(zip(lp_ids[i][:k], lps[i][:k]))
            result[req.request_id] = SampledToken(token_ids[i], lp)
        return result


def _tokens_between(request, start: int, end: int) -> list[int]:
    n = request.num_prompt_tokens
    if end <= n:
        return request.prompt_token_ids[start:end]
    return (request.prompt_token_ids[start:] + request.output_token_ids[max(0, start - n):end - n])
