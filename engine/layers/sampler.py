"""Batched sampler: penalties, greedy, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

References: vLLM v1 `Sampler` / `TopKTopPSampler` (exponential-race sampling with per-request
generators), HF `RepetitionPenaltyLogitsProcessor`, OpenAI presence/frequency penalties.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.core.request import Request
from loraplex.engine.kernels import cpu_kernels

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, num_output_tokens: int) -> int:
    """Seed for one request's draw at one step (splitmix64 of seed and step): depends only on the
    request, never on the batch, so a seeded request replays identically after preemption."""
    x = (seed * 0x9E3779B97F4A7C15 + num_output_tokens + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)  # manual_seed wants a non-negative int64


def _padded(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64,
                        device=device).view(len(rows), width)  # [num_rows, width]


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling state of one step. Rows follow the order of `requests` given to build()."""
    temperature: torch.Tensor  # [num_rows] float32; 1.0 on greedy rows (they never divide)
    top_k: torch.Tensor  # [num_rows] int64; vocab_size where disabled
    max_top_k: int  # largest enabled top_k, known on the host so top-k needs no device sync
    top_p: torch.Tensor  # [num_rows] float32
    min_p: torch.Tensor  # [num_rows] float32
    repetition_penalties: torch.Tensor  # [num_rows] float32
    presence_penalties: torch.Tensor  # [num_rows] float32
    frequency_penalties: torch.Tensor  # [num_rows] float32
    is_greedy: torch.Tensor  # [num_rows] bool
    all_greedy: bool
    all_random: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    no_penalties: bool
    # padded with vocab_size; None when no row needs penalties
    prompt_token_ids: torch.Tensor | None  # [num_rows, max_prompt_len] int64
    output_token_ids: torch.Tensor | None  # [num_rows, max_output_len] int64
    step_seeds: dict[int, int]  # row -> seed of this step's noise, for seeded random rows only
    # (row, token id) pairs forced to -inf while a request is below its min_tokens
    suppress_rows: torch.Tensor | None  # [num_suppressed] int64
    suppress_token_ids: torch.Tensor | None  # [num_suppressed] int64
    # logit_bias entries of every row, flattened; None when no row has any
    bias_rows: torch.Tensor | None  # [num_biased] int64
    bias_token_ids: torch.Tensor | None  # [num_biased] int64
    bias_values: torch.Tensor | None  # [num_biased] float32
    # structured output: bit t of row r allows token t (all ones for free rows); None when no row is constrained
    token_bitmask: torch.Tensor | None  # [num_rows, ceil(vocab / 32)] int32
    max_num_logprobs: int | None

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @staticmethod
    def plain_greedy(requests: list[Request], token_bitmask: torch.Tensor | None = None) -> bool:
        """Whether every row is a plain argmax: greedy, no penalties, logit bias, logprobs or grammar, and no token
        suppressed now (min_tokens reached, no bad words): what `Sampler` does then needs no metadata, so
        `Sampler.sample` skips building it (a dozen small tensors, ~1% of a batch-1 step). False does not promise
        otherwise."""
        if token_bitmask is not None:
            return False
        for r in requests:
            p = r.sampling_params
            if not p.is_greedy or p.needs_penalties or p.logit_bias or p.logprobs is not None \
                    or p.bad_words_token_ids or r.num_output_tokens < p.min_tokens:
                return False
        return True

    @classmethod
    def build(cls, requests: list[Request], vocab_size: int, device,
              token_bitmask: torch.Tensor | None = None) -> SamplingMetadata:
        params = [r.sampling_params for r in requests]
        greedy = [p.is_greedy for p in params]

        def f32(values):
            return torch.tensor(values, dtype=torch.float32, device=device)

        top_k = [vocab_size if p.top_k <= 0 or g else min(p.top_k, vocab_size) for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        no_penalties = not any(p.needs_penalties for p in params)
        prompt_ids = output_ids = None
        if not no_penalties:
            prompt_ids = _padded([r.prompt_token_ids for r in requests], vocab_size, device)
            output_ids = _padded([r.output_token_ids for r in requests], vocab_size, device)

        suppress: list[tuple[int, int]] = []
        for row, (req, p) in enumerate(zip(requests, params)):
            if req.num_output_tokens < p.min_tokens:
                blocked = set(p.stop_token_ids) | (set() if p.ignore_eos else set(req.eos_token_ids))
                suppress.extend((row, t) for t in sorted(blocked) if t < vocab_size)
            if p.bad_words_token_ids:
                suppress.extend((row, t) for t in banned_next_tokens(p.bad_words_token_ids, req.output_token_ids)
                                if t < vocab_size)
        suppress_rows = suppress_ids = None
        if suppress:
            suppress_rows = torch.tensor([row for row, _ in suppress], dtype=torch.int64, device=device)
            suppress_ids = torch.tensor([t for _, t in suppress], dtype=torch.int64, device=device)

        biased = [(row, t, b) for row, p in enumerate(params) for t, b in p.logit_bias if t < vocab_size]
        bias_rows = bias_ids = bias_values = None
        if biased:
            bias_rows = torch.tensor([r for r, _, _ in biased], dtype=torch.int64, device=device)
            bias_ids = torch.tensor([t for _, t, _ in biased], dtype=torch.int64, device=device)
            bias_values = f32([b for _, _, b in biased])

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=f32([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            max_top_k=max((k for k in top_k if k < vocab_size), default=vocab_size),
            top_p=f32(top_p),
            min_p=f32(min_p),
            repetition_penalties=f32([p.repetition_penalty for p in params]),
            presence_penalties=f32([p.presence_penalty for p in params]),
            frequency_penalties=f32([p.frequency_penalty for p in params]),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            no_top_k=all(k >= vocab_size for k in top_k),
            no_top_p=all(p >= 1.0 for p in top_p),
            no_min_p=all(p <= 0.0 for p in min_p),
            no_penalties=no_penalties,
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            step_seeds={row: step_seed(p.seed, req.num_output_tokens)
                        for row, (req, p, g) in enumerate(zip(requests, params, greedy))
                        if p.seed is not None and not g},
            suppress_rows=suppress_rows,
            suppress_token_ids=suppress_ids,
            bias_rows=bias_rows,
            bias_token_ids=bias_ids,
            bias_values=bias_values,
            token_bitmask=None if token_bitmask is None else token_bitmask.to(device),
            max_num_logprobs=min(max(wanted), vocab_size) if wanted else None,
        )


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [num_rows] int64
    # column 0: the sampled token; columns 1..k: the k most likely tokens (k = max_num_logprobs)
    logprob_token_ids: torch.Tensor | None  # [num_rows, k + 1] int64
    logprobs: torch.Tensor | None  # [num_rows, k + 1] float32, log_softmax of the raw logits


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (HF semantics); presence and frequency
    penalties over output tokens (OpenAI semantics). logits: [num_rows, vocab] float32."""
    num_rows, vocab_size = logits.shape
    assert md.prompt_token_ids is not None and md.output_token_ids is not None
    # an extra column absorbs the padding id (= vocab_size)
    seen = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, md.prompt_token_ids, True)
    seen.scatter_(1, md.output_token_ids, True)
    rep = md.repetition_penalties.unsqueeze(1)  # [num_rows, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen[:, :vocab_size], penalised, logits)

    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=logits.device)
    counts.scatter_add_(1, md.output_token_ids, torch.ones_like(md.output_token_ids, dtype=torch.float32))
    counts = counts[:, :vocab_size]  # [num_rows, vocab]
    logits = logits - md.frequency_penalties.unsqueeze(1) * counts
    return logits - md.presence_penalties.unsqueeze(1) * (counts > 0).float()


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      max_top_k: int | None = None) -> torch.Tensor:
    """Mask everything outside each row's top-k, then outside the smallest set whose probability
    (renormalised after top-k) reaches top-p. logits: [num_rows, vocab]; k/p: [num_rows] or None.
    Ties with the k-th logit are kept."""
    if top_p is None:
        assert top_k is not None
        max_k = max_top_k or logits.shape[1]
        values = torch.topk(logits, max_k, dim=1).values  # [num_rows, max_k]
        kth = values.gather(1, (top_k.clamp(max=max_k) - 1).unsqueeze(1))  # [num_rows, 1]
        kth = kth.masked_fill((top_k > max_k).unsqueeze(1), float("-inf"))  # rows without top-k
        return logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = torch.sort(logits, dim=1, descending=True)  # [num_rows, vocab]
    if top_k is not None:
        ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)  # [1, vocab]
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=1)
    # drop a token when the tokens ranked above it already reach top_p; the first always stays
    mass_before = probs.cumsum(dim=1) - probs
    # rows with top_p == 1 are exempt: rounding can push their running mass to 1.0
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=1)  # [num_rows, vocab]
    threshold = probs.amax(dim=1, keepdim=True) * min_p.unsqueeze(1)  # [num_rows, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim of [rows, vocab], ties to the lowest index (as argmax). On CPU the
    loaded kernel does it in one vectorised pass; `max(dim).indices`, the same reduction, runs 1.1x
    (float32) to 4x (bfloat16) faster than `argmax` otherwise."""
    if logits.device.type == "cpu" and logits.dim() == 2 and logits.dtype in (torch.float32, torch.bfloat16) \
            and cpu_kernels.loaded():
        return torch.ops.loraplex_cpu.argmax_rows(logits)
    return logits.max(dim=-1).indices


class Sampler:
    """Turns one step's logits into token ids (and logprobs). Holds one reusable generator per
    device for seeded rows; it is re-seeded per row and step, so no state carries over."""

    def __init__(self) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: list[Request], device,
               token_bitmask: torch.Tensor | None = None) -> SamplerOutput:
        """The requests' rows of `logits` sampled by their parameters: plain argmax rows without building any
        metadata (SamplingMetadata.plain_greedy), the others through SamplingMetadata and __call__."""
        if SamplingMetadata.plain_greedy(requests, token_bitmask):
            return SamplerOutput(greedy(logits), None, None)  # what __call__ computes for such rows
        return self(logits, SamplingMetadata.build(requests, logits.shape[-1], device, token_bitmask))

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        # logits: [num_rows, vocab], any float dtype
        if (md.all_greedy and md.no_penalties and md.suppress_rows is None and md.bias_rows is None
                and md.token_bitmask is None and md.max_num_logprobs is None):
            # plain greedy needs no float32 copy: the cast is exact, so the argmax is the same
            return SamplerOutput(greedy(logits), None, None)
        raw = logits.to(torch.float32, copy=True)  # work in float32 on a private copy
        x = raw if md.no_penalties else apply_penalties(raw, md)
        edits = md.suppress_rows is not None or md.bias_rows is not None or md.token_bitmask is not None
        if edits and x is raw and md.max_num_logprobs is not None:
            x = raw.clone()  # logprobs read the raw logits
        if md.bias_rows is not None:  # (row, token) pairs are unique: a plain indexed add
            x[md.bias_rows, md.bias_token_ids] += md.bias_values
        if md.token_bitmask is not None:
            x.masked_fill_(~unpack_token_bitmask(md.token_bitmask, x.shape[1]), float("-inf"))
        if md.suppress_rows is not None:
            x[md.suppress_rows, md.suppress_token_ids] = float("-inf")

        greedy_ids = None if md.all_random else greedy(x)  # [num_rows]
        if md.all_greedy:
            sampled = greedy_ids
        else:
            random_ids = self._sample(x, md)
            sampled = random_ids if md.all_random else torch.where(md.is_greedy, greedy_ids, random_ids)

        if md.max_num_logprobs is None:
            return SamplerOutput(sampled, None, None)
        logprobs = raw.log_softmax(dim=1)  # [num_rows, vocab]
        sampled_logprob = logprobs.gather(1, sampled.unsqueeze(1))  # [num_rows, 1]
        ids, lps = sampled.unsqueeze(1), sampled_logprob
        if md.max_num_logprobs > 0:
            top = torch.topk(logprobs, md.max_num_logprobs, dim=1)  # [num_rows, k]
            ids = torch.cat([ids, top.indices], dim=1)
            lps = torch.cat([lps, top.values], dim=1)
        return SamplerOutput(sampled, ids, lps)

    def _sample(self, x: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        x = x / md.temperature.unsqueeze(1)
        if not (md.no_top_k and md.no_top_p):
            x = apply_top_k_top_p(x, None if md.no_top_k else md.top_k,
                                  None if md.no_top_p else md.top_p, md.max_top_k)
        if not md.no_min_p:
            x = apply_min_p(x, md.min_p)
        probs = x.softmax(dim=1)  # [num_rows, vocab]
        # exponential race: argmax(p_i / E_i), E_i ~ Exp(1), picks i with probability p_i
        noise = torch.empty_like(probs)
        if len(md.step_seeds) < md.num_rows:
            noise.exponential_()
        if md.step_seeds:
            gen = self._generator(probs.device)
            for row, seed in md.step_seeds.items():
                gen.manual_seed(seed)
                noise[row].exponential_(generator=gen)
        return (probs / noise.clamp_min_(1e-20)).argmax(dim=1)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def prompt_token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, num_top: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of given tokens: logits [rows, vocab] (the raw model output), target_ids [rows] int64 ->
    (logprob [rows], rank [rows] int64: 1 + how many tokens are more likely, top ids and logprobs [rows, num_top]),
    all from float32 log_softmax; no sampling parameter (temperature, penalties) applies, as in vLLM."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [rows, vocab]
    target = logprobs.gather(1, target_ids[:, None])  # [rows, 1]
    rank = (logprobs > target).sum(dim=1) + 1  # [rows]
    top_lps, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], target_ids[:, None][:, :0])
    return target[:, 0], rank, top_ids, top_lps


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32, bit j of word w = token 32 w + j (xgrammar's layout) -> [rows, vocab_size] bool allowed."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1  # [rows, words, 32]; arithmetic shift, then masked
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def banned_next_tokens(bad_words: tuple[tuple[int, ...], ...], output_token_ids: list[int]) -> list[int]:
    """The tokens that would complete a bad word now: a one-token word always, a longer one when the output ends
    with all of it but its last token (vLLM's bad_words semantics)."""
    banned = []
    for seq in bad_words:
        prefix = seq[:-1]
        if not prefix or (len(output_token_ids) >= len(prefix) and tuple(output_token_ids[-len(prefix):]) == prefix):
            banned.append(seq[-1])
    return sorted(set(banned))
