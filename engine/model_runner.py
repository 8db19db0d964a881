"""ModelRunner: turns a SchedulerOutput into a ForwardBatch, runs the model, samples (one host sync)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loraplex.engine.config import CacheConfig, ModelConfig
from loraplex.engine.forward_batch import AttentionMetadata, ForwardBatch, KVCache, PrefillChunk
from loraplex.engine.sampler import Sampler, SamplingMetadata

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
        num_slots = self.num_blocks * self.block_size
        shape = (num_slots, model_config.num_key_value_heads, model_config.head_dim)
        self.kv_caches = [KVCache(torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(model_config.num_hidden_layers)]
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB, %s on %s)", self.num_blocks,
                    self.block_size, self.num_blocks * per_block / 2**20, dtype, device)
        self.sampler = Sampler()
        self._arange = torch.arange(max_model_len + self.block_size, dtype=torch.int64)

    # ---- batch building -------------------------------------------------------------------
    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat KV slots of positions [start, end) for one request's block table."""
        pos = self._arange[start:end]  # [n]
        table = torch.tensor(block_ids, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def split(self, scheduled) -> tuple[list, list]:
        """Single-token steps that continue a sequence run as decodes; the rest are prefill chunks."""
        decodes = [s for s in scheduled if s.num_new_tokens == 1 and s.start_pos > 0]
        prefills = [s for s in scheduled if not (s.num_new_tokens == 1 and s.start_pos > 0)]
        return decodes, prefills

    def build_batch(self, decodes: list, prefills: list) -> ForwardBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        logits_rows: list[int] = []
        attn = AttentionMetadata(num_decode_tokens=len(decodes),
                                 sliding_window=self.model_config.sliding_window)
        if decodes:
            lens = torch.tensor([s.start_pos + 1 for s in decodes], dtype=torch.int64)  # [num_decodes]
            max_len = int(lens.max())
            max_blocks = (max_len + bs - 1) // bs
            table = torch.tensor([(s.block_ids + [0] * max_blocks)[:max_blocks] for s in decodes],
                                 dtype=torch.int64)  # [num_decodes, max_blocks]
            input_ids.extend(_token_at(s.request, s.start_pos) for s in decodes)
            pos = self._arange[:max_len]  # [max_len]
            slots = table[:, pos // bs] * bs + pos % bs  # [num_decodes, max_len]
            attn.decode_kv_slots = slots.to(self.device, non_blocking=True)
            attn.decode_kv_lens = lens.to(self.device, non_blocking=True)
            attn.decode_mask = (pos[None, :] < lens[:, None])[:, None, None, :].to(self.device)
            positions.append(lens - 1)
            slot_mapping.append(slots.gather(1, (lens - 1)[:, None]).view(-1))
            logits_rows.extend(i for i, s in enumerate(decodes) if s.sample)
        row = len(decodes)
        for s in prefills:
            start, end = s.start_pos, s.start_pos + s.num_new_tokens
            input_ids.extend(_tokens_between(s.request, start, end))
            positions.append(self._arange[start:end])
            kv_slots = self._slots(s.block_ids, 0, end)  # [end]
            slot_mapping.append(kv_slots[start:])
            mask = None
            if start > 0:  # causal with an offset: query i sits at position start + i
                mask = (self._arange[None, :end] <= self._arange[start:end, None]).to(self.device)
            attn.prefills.append(PrefillChunk(row, s.num_new_tokens, kv_slots.to(self.device), mask))
            row += s.num_new_tokens
            if s.sample:
                logits_rows.append(row - 1)
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64).to(self.device, non_blocking=True),
            positions=torch.cat(positions).to(self.device, non_blocking=True),
            slot_mapping=torch.cat(slot_mapping).to(self.device, non_blocking=True),
            attn=attn,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64).to(self.device, non_blocking=True),
        )

    # ---- execution ------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduler_output) -> dict[str, SampledToken]:
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return {}
        decodes, prefills = self.split(scheduled)
        batch = self.build_batch(decodes, prefills)
        hidden = self.model(batch, self.kv_caches)  # [num_tokens, hidden]
        sampling = [s for s in decodes + prefills if s.sample]  # same order as logits_indices
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


def _token_at(request, pos: int) -> int:
    n = request.num_prompt_tokens
    return request.prompt_token_ids[pos] if pos < n else request.output_token_ids[pos - n]


def _tokens_between(request, start: int, end: int) -> list[int]:
    n = request.num_prompt_tokens
    if end <= n:
        return request.prompt_token_ids[start:end]
    return (request.prompt_token_ids[start:] + request.output_token_ids[max(0, start - n):end - n])
