"""ModelRunner: turns a SchedulerOutput into a ForwardBatch, runs the model, samples (one host sync)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from loraplex.engine.core.config import CacheConfig, ModelConfig
from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.attention import (
    advance_decode_batch,
    allocate_kv_caches,
    build_forward_batch,
)
from loraplex.engine.layers.forward_batch import ForwardBatch
from loraplex.engine.layers.greedy_head import MAX_ROWS as SCREENED_HEAD_MAX_ROWS
from loraplex.engine.layers.greedy_head import ScreenedGreedyHead
from loraplex.engine.layers.sampler import (
    Sampler,
    SamplingMetadata,
    greedy,
    prompt_token_logprobs,
)

logger = logging.getLogger(__name__)

PROMPT_LOGPROB_ROWS_PER_CALL = 256  # bounds the float32 [rows, vocab] buffer of prompt logprobs (~50 MB at 49k)


@dataclass(slots=True)
class PromptLogprob:
    """One prompt token's score given the tokens before it."""
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # the most likely tokens at its position, best first


@dataclass(slots=True)
class SampledToken:
    token_id: int | None  # None: this step ran a prefill chunk of the request without sampling
    # (token_id, logprob) pairs: the sampled token first, then the top alternatives
    logprobs: list[tuple[int, float]] | None = None
    # prompt tokens this step scored (a request with SamplingParams.prompt_logprobs), in prompt order
    prompt_logprobs: list[PromptLogprob] | None = None
    # a request with a draft (speculative decoding): the greedy token after each of its rows, token_id the first
    token_ids: list[int] | None = None


@dataclass(slots=True)
class PromptLogprobRows:
    """Which rows of a step's batch score which prompt tokens: row i's logits give the logprob of target i."""
    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    owners: list[tuple[object, int, int]] = field(default_factory=list)  # (request, first, end) into rows


def kv_cache_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    # K and V, every layer: [block_size, num_kv_heads, head_dim]
    return 2 * model_config.num_hidden_layers * block_size * model_config.num_key_value_heads \
        * model_config.head_dim * elem


class ModelRunner:
    """Owns the model, its paged KV cache and the sampler on one device."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, cache_config: CacheConfig,
                 device: torch.device, dtype: torch.dtype, max_model_len: int,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = cache_config.block_size
        self.max_model_len = max_model_len
        # keys and values in the model's dtype, or bfloat16 under a float32 model (attention then runs in bfloat16:
        # engine/layers/attention.py casts to the cache's dtype, the one-call kernels do the same)
        self.kv_cache_dtype = kv_cache_dtype or dtype
        per_block = kv_cache_bytes_per_block(model_config, self.block_size, self.kv_cache_dtype)
        self.num_blocks = cache_config.num_blocks or max(1, cache_config.kv_cache_memory_bytes // per_block)
        self.kv_caches = allocate_kv_caches(model_config.num_hidden_layers, self.num_blocks * self.block_size,
                                            model_config.num_key_value_heads, model_config.head_dim,
                                            self.kv_cache_dtype, device)
        self.kv_cache_bytes = self.num_blocks * per_block
        logger.info("KV cache: %d blocks x %d tokens (%.1f MiB, %s on %s)", self.num_blocks,
                    self.block_size, self.num_blocks * per_block / 2**20, self.kv_cache_dtype, device)
        # the fused CPU attention kernel (built once per machine); the plain-torch path otherwise
        self.cpu_attention_kernel = (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
                                     and cpu_kernels.available())
        logger.info("attention: %s", "fused CPU kernel" if self.cpu_attention_kernel else "plain torch")
        self.sampler = Sampler()
        self.adapter_hook = None  # AdapterHook: sets each step's per-row adapter metadata
        self.structured_output = None  # StructuredOutputManager: each step's token bitmask, once a request needs one
        self.greedy_head: ScreenedGreedyHead | None = None  # plain-greedy steps' tokens without the full logits

    # ---- batch building -------------------------------------------------------------------
    def build_batch(self, scheduled, prompt_rows: PromptLogprobRows | None = None) -> ForwardBatch:
        """`scheduled`: the scheduler's list, single-token entries first (the decode group). `prompt_rows`, when
        given, is filled with the rows that score prompt tokens for requests that asked for prompt logprobs."""
        input_ids: list[int] = []
        logits_rows: list[int] = []
        row = 0
        for s in scheduled:
            if s.draft_token_ids:  # the last token, then the draft: every row is scored
                input_ids.extend(_tokens_between(s.request, s.start_pos, s.start_pos + 1))
                input_ids.extend(s.draft_token_ids)
                logits_rows.extend(range(row, row + s.num_new_tokens))
                row += s.num_new_tokens
                continue
            input_ids.extend(_tokens_between(s.request, s.start_pos, s.start_pos + s.num_new_tokens))
            if prompt_rows is not None and s.request.wants_prompt_logprobs:
                _add_prompt_rows(prompt_rows, s, row)
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
        if scheduler_output.num_steps > 1:
            multi = self._execute_multi_step(scheduled, scheduler_output.num_steps)
            if multi is not None:
                return multi
        prompt_rows = PromptLogprobRows()
        batch = self.build_batch(scheduled, prompt_rows)
        if self.adapter_hook is not None:
            self.adapter_hook.prepare(scheduled, batch)
        hidden = self.model(batch, self.kv_caches)  # [num_tokens, hidden]
        result: dict[str, SampledToken] = {}
        if prompt_rows.rows:
            for request, scored in self._score_prompt_rows(hidden, prompt_rows):
                result[request.request_id] = SampledToken(None, prompt_logprobs=scored)
        sampling = [s for s in scheduled if s.sample]  # same order as logits_indices
        if not sampling:
            return result
        if self._screened_greedy(hidden, batch, sampling, result):
            return result
        logits = self.model.compute_logits(hidden[batch.logits_indices], batch.logits_indices)  # [num_sampled, vocab]
        if any(s.draft_token_ids for s in sampling):
            logits, sampling = self._verify_drafts(logits, sampling, result)
            if not sampling:
                return result
        requests = [s.request for s in sampling]
        bitmask = None if self.structured_output is None else self.structured_output.fill_bitmask(requests)
        out = self.sampler.sample(logits, requests, self.device, bitmask)
        token_ids = out.sampled_token_ids.tolist()  # the step's one host sync
        if out.logprobs is not None:
            lp_ids, lps = out.logprob_token_ids.tolist(), out.logprobs.tolist()
        for i, req in enumerate(requests):
            lp = None
            if out.logprobs is not None and req.sampling_params.logprobs is not None:
                k = req.sampling_params.logprobs + 1
                lp = list(zip(lp_ids[i][:k], lps[i][:k]))
            scored = result[req.request_id].prompt_logprobs if req.request_id in result else None
            result[req.request_id] = SampledToken(token_ids[i], lp, scored)
        return result

    def _execute_multi_step(self, scheduled, num_steps: int) -> dict[str, SampledToken] | None:
        """Up to `num_steps` decode steps of the same plain-greedy rows (the scheduler reserved their blocks), each
        step fed the tokens of the one before: the tokens single steps would give, without a schedule, an update and
        an output between them. Stops early once every row has sampled one of its stop tokens (the scheduler's stop
        rules then drop what follows; stop strings are the detokenizer's). Each row's tokens go out as a draft's do
        (SampledToken.token_ids). None when a row is not a plain argmax of the logits (the step runs as usual)."""
        requests = [s.request for s in scheduled]
        if not self._argmax_only(requests):
            return None
        n = len(scheduled)
        stops = [frozenset(r.sampling_params.stop_token_ids).union(() if r.sampling_params.ignore_eos
                                                                    else r.eos_token_ids) for r in requests]
        input_ids = [_tokens_between(s.request, s.start_pos, s.start_pos + 1)[0] for s in scheduled]
        positions = [s.start_pos for s in scheduled]
        tables = [s.block_ids for s in scheduled]
        # on the CPU kernel path the batch moves on in place (advance_decode_batch); otherwise it is built anew
        in_place = self.cpu_attention_kernel
        batch = build_forward_batch(input_ids, [1] * n, positions, tables, self.block_size, self.device,
                                    sliding_window=self.model_config.sliding_window, cpu_kernel=in_place,
                                    lookahead=num_steps if in_place else 1)
        if self.adapter_hook is not None:  # per-row metadata: the same rows every step
            self.adapter_hook.prepare(scheduled, batch)
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        token_ids = None  # the last step's tokens, fed to the next
        for step in range(num_steps):
            if step:
                if in_place:
                    advance_decode_batch(batch, token_ids)
                else:
                    positions = [p + 1 for p in positions]
                    metadata = batch.adapter_metadata
                    batch = build_forward_batch(input_ids, [1] * n, positions, tables, self.block_size, self.device,
                                                sliding_window=self.model_config.sliding_window)
                    batch.adapter_metadata = metadata
            hidden = self.model(batch, self.kv_caches)  # [n, hidden]
            token_ids = self._greedy_rows(hidden, batch)
            input_ids = token_ids.tolist()
            for i, token_id in enumerate(input_ids):
                if not done[i]:
                    out[i].append(token_id)
                    done[i] = token_id in stops[i]
            if all(done):
                break
        return {r.request_id: SampledToken(ids[0], token_ids=ids) for r, ids in zip(requests, out)}

    def _greedy_rows(self, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """[rows] int64: the argmax token of each row's logits (`hidden` holds the batch's logits rows), through the
        screened head where it takes them (the same tokens), else from the logits."""
        rows = batch.logits_indices
        head = self._screened_head(rows)
        token_ids = None if head is None else head.greedy(hidden)
        return token_ids if token_ids is not None else greedy(self.model.compute_logits(hidden, rows))

    def _argmax_only(self, requests: list) -> bool:
        """Each request's token is the plain argmax of its logits: plain greedy sampling, no grammar constraining it."""
        return SamplingMetadata.plain_greedy(requests) and not (
            self.structured_output is not None and self.structured_output.constrains(requests))

    def _screened_head(self, rows: torch.Tensor) -> ScreenedGreedyHead | None:
        """The screened head, where it takes these logits rows: few enough, and the base head computes every one
        (no adapter's own head takes a row)."""
        head = self.greedy_head
        if head is None or len(rows) > SCREENED_HEAD_MAX_ROWS or self.model.output_head(rows) is not head.head:
            return None
        return head

    def _screened_greedy(self, hidden: torch.Tensor, batch: ForwardBatch, sampling: list,
                         result: dict[str, SampledToken]) -> bool:
        """When every sampled row is a plain argmax (SamplingMetadata.plain_greedy, no grammar; a draft's rows are
        greedy) of the base head: the step's tokens into `result` through the screened head
        (engine/layers/greedy_head.py), the same tokens as the logits give for fewer bytes, and True. False: compute
        the logits."""
        head = self._screened_head(batch.logits_indices)
        if head is None or not self._argmax_only([s.request for s in sampling]):
            return False
        token_ids = head.greedy(hidden[batch.logits_indices])  # [num_sampled]: one per row, a draft's rows included
        if token_ids is None:
            return False
        token_ids = token_ids.tolist()  # the step's one host sync
        row = 0
        for s in sampling:
            rid = s.request.request_id
            if s.draft_token_ids:  # as _verify_drafts: the greedy token after each of its rows
                ids = token_ids[row:row + s.num_new_tokens]
                row += s.num_new_tokens
                result[rid] = SampledToken(ids[0], token_ids=ids)
                continue
            scored = result[rid].prompt_logprobs if rid in result else None
            result[rid] = SampledToken(token_ids[row], None, scored)
            row += 1
        return True

    def _verify_drafts(self, logits: torch.Tensor, sampling: list, result: dict[str, SampledToken]):
        """Greedy tokens for every row of the entries with a draft (into `result`); returns the other entries'
        logits rows (one each) and those entries, for the sampler."""
        plain_rows, plain, spec = [], [], []
        row = 0
        for s in sampling:
            if s.draft_token_ids:
                spec.append((s, row))
                row += s.num_new_tokens
            else:
                plain_rows.append(row)
                plain.append(s)
                row += 1
        spec_rows = [r for s, first in spec for r in range(first, first + s.num_new_tokens)]
        greedy_ids = greedy(logits[torch.tensor(spec_rows, device=logits.device)]).tolist()
        k = 0
        for s, _ in spec:
            ids = greedy_ids[k:k + s.num_new_tokens]
            k += s.num_new_tokens
            result[s.request.request_id] = SampledToken(ids[0], token_ids=ids)
        if not plain:
            return logits, plain
        return logits[torch.tensor(plain_rows, device=logits.device)], plain

    def _score_prompt_rows(self, hidden: torch.Tensor, prompt_rows: PromptLogprobRows):
        """(request, [PromptLogprob]) per request with prompt rows in this step: logits for those rows only, in
        slices of PROMPT_LOGPROB_ROWS_PER_CALL (one more host sync, in steps that have such rows)."""
        num_top = max(r.sampling_params.prompt_logprobs for r, _, _ in prompt_rows.owners)
        rows = torch.tensor(prompt_rows.rows, dtype=torch.int64, device=hidden.device)
        targets = torch.tensor(prompt_rows.targets, dtype=torch.int64, device=hidden.device)
        parts = []
        for start in range(0, len(prompt_rows.rows), PROMPT_LOGPROB_ROWS_PER_CALL):
            sl = slice(start, start + PROMPT_LOGPROB_ROWS_PER_CALL)
            logits = self.model.compute_logits(hidden[rows[sl]], rows[sl])  # [slice rows, vocab]
            parts.append(prompt_token_logprobs(logits, targets[sl], min(num_top, logits.shape[-1])))
        lp, rank, top_ids, top_lps = (torch.cat(p).tolist() for p in zip(*parts))
        for request, first, end in prompt_rows.owners:
            k = request.sampling_params.prompt_logprobs
            yield request, [PromptLogprob(prompt_rows.targets[i], lp[i], rank[i], list(zip(top_ids[i][:k], top_lps[i][:k])))
                            for i in range(first, end)]


def _add_prompt_rows(prompt_rows: PromptLogprobRows, s, first_row: int) -> None:
    """The rows of scheduled chunk `s` (starting at batch row `first_row`) whose logits score a prompt token not
    scored yet: position p predicts prompt token p + 1, for p + 1 < num_prompt_tokens."""
    request = s.request
    done = len(request.prompt_logprobs)  # prompt tokens 1..done are scored
    first_pos = max(s.start_pos, done)
    end_pos = min(s.start_pos + s.num_new_tokens, request.num_prompt_tokens - 1)
    if first_pos >= end_pos:
        return
    start = len(prompt_rows.rows)
    prompt_rows.rows.extend(first_row + p - s.start_pos for p in range(first_pos, end_pos))
    prompt_rows.targets.extend(request.prompt_token_ids[first_pos + 1:end_pos + 1])
    prompt_rows.owners.append((request, start, len(prompt_rows.rows)))


def _tokens_between(request, start: int, end: int) -> list[int]:
    n = request.num_prompt_tokens
    if end <= n:
        return request.prompt_token_ids[start:end]
    return (request.prompt_token_ids[start:] + request.output_token_ids[max(0, start - n):end - n])
