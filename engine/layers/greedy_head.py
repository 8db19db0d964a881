"""Exact greedy tokens from a dense output head for fewer bytes: screen the vocabulary with an 8-bit copy, then compute
the few rows that can still win exactly.

A plain-greedy row needs only the argmax of its logits, and at small batch the head (vocab x hidden, the largest
matrix of a small model) is bound by the bytes it reads: 1.9 ms of a ~11 ms bfloat16 batch-1 step of the default model,
3.6 ms of float32's ~18. `ScreenedGreedyHead` keeps a copy of the head as 8-bit codes (per group of 64 input channels,
symmetric round-to-nearest: a quarter of float32's bytes, half of bfloat16's) and multiplies it with int8 activations
through the streaming kernel's channel-lane path (engine/quant/stream.py). For every vocabulary row v the exact logit
r_v (what the dense head computes) lies within a bound b_v of the screened one a_v:

    r_v - a_v = x . (w_v - w^_v) + (x - x^) . w^_v
    |r_v - a_v| <= |x|_2 |w_v - w^_v|_2 + |x - x^|_2 |w^_v|_2 + float32 summation margins     (Cauchy-Schwarz)

with both per-row norms computed once here and both activation norms per call. Every row whose a_v + b_v reaches the
largest a_u - b_u (less one bfloat16 rounding step when the logits are bfloat16, where ties round together) is a
candidate; the dense kernel computes exactly those rows (each output is one float32 dot product in a fixed order, so a
row's value does not depend on which rows share the call) and the argmax over them, ties to the lowest index, is the
plain path's token bit for bit. On the default model a row leaves a median of 4 candidates (p90 22-33, max 154-174 over
256 decode positions), and the head costs 2.3x less at one row in bfloat16, 5.3x in float32, 1.3x at 256 rows
(scripts/bench/bench_greedy_head.py).

The model runner takes it for a step whose sampled rows are all plain greedy (speculative drafts' rows included); the
plain path (full logits, then `sampler.greedy`) is the reference, and what runs for every other step: sampling,
penalties, logprobs, grammars, adapters with their own head, non-finite activations. `reference_greedy` is the C++
call's plain-torch twin.
"""
from __future__ import annotations

import logging

import torch

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.sampler import greedy
from loraplex.engine.quant.stream import (
    ACT_BLOCK,
    ACT_CHUNK,
    LANES,
    StreamLinear,
    quantize_activations,
)

logger = logging.getLogger(__name__)

GROUP = 64  # input channels per 8-bit scale
ZERO_POINT = 128  # the codes' one zero point (symmetric codes)
MAX_ROWS = 256  # faster at every row count measured up to here (bf16 default model: 2.3x at 1 row, 1.3x at 256)
# float32 rounding in the two products, as a share of |x|_1 max|w| per input channel: the dense kernel's sum of K
# products is off by at most ~K * 2^-24 of sum|x_k w_k| <= |x|_1 max|w| (fewer roundings in its lane order), the
# screening kernel's (exact integer sums, then one scaled sum per 32 channels) by far less: 2 K 2^-24 covers both
SUMMATION_MARGIN_PER_CHANNEL = 2 * 2.0 ** -24
NORM_SLACK = 1.001  # the norms' own float32 rounding (relative ~1e-6)
BF16_TIE = 2.0 ** -6  # bfloat16 logits: values within one rounding step (<= 2^-7 relative) of the top may tie with it
ROWS_PER_CHUNK = 8192  # quantize the copy this many vocabulary rows at a time (bounds the float32 temporaries)


def quantize_head(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [V, K] -> (codes uint8 [V, K], scales float32 [V, K / GROUP], zeros int32 [V, K / GROUP],
    norms float32 [2, V]): symmetric round-to-nearest 8-bit codes (s = max|w| / 127 per group, q = round(w / s) + 128,
    one zero point for every group, which the int8 kernel applies once per row: ~1.2x faster than min/max codes here),
    w^ = (q - z) * s as the streaming kernel reads them; norms[0] = |w_v - w^_v|_2, norms[1] = |w^_v|_2."""
    num_rows, k = weight.shape
    codes = torch.empty(num_rows, k, dtype=torch.uint8)
    scales = torch.empty(num_rows, k // GROUP, dtype=torch.float32)
    zeros = torch.full((num_rows, k // GROUP), ZERO_POINT, dtype=torch.int32)
    norms = torch.empty(2, num_rows, dtype=torch.float32)
    for lo in range(0, num_rows, ROWS_PER_CHUNK):
        hi = min(num_rows, lo + ROWS_PER_CHUNK)
        w = weight[lo:hi].float().view(hi - lo, k // GROUP, GROUP)  # [rows, groups, GROUP]
        s = (w.abs().amax(-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.clamp(torch.round(w / s), -127, 127)
        dequantized = q * s  # exactly the kernel's (q + 128 - 128) * s in float32
        codes[lo:hi] = (q + ZERO_POINT).view(hi - lo, k).to(torch.uint8)
        scales[lo:hi] = s.view(hi - lo, -1)
        norms[0, lo:hi] = (w - dequantized).view(hi - lo, k).norm(dim=-1)
        norms[1, lo:hi] = dequantized.view(hi - lo, k).norm(dim=-1)
    return codes, scales, zeros, norms


class ScreenedGreedyHead:
    """Greedy token ids from `head` (a dense StreamLinear, see `supports`) through the 8-bit screening (module doc)."""

    def __init__(self, head: StreamLinear) -> None:
        if not self.supports(head):
            raise ValueError(f"greedy head screening needs a dense float32/bfloat16 streaming head without bias whose "
                             f"input width is a multiple of {ACT_CHUNK} and vocabulary of {LANES}; got {head!r}")
        self.head = head
        weight = head.weight  # [V, K], the dense head's own (shared with a tied embedding)
        num_rows, k = weight.shape
        codes, scales, zeros, self.norms = quantize_head(weight)
        self.screen = StreamLinear(k, num_rows, 8, codes, scales, zeros, GROUP)
        self.screen.set_act_int8(True)  # channel lanes, integer dot products
        self.max_abs_weight = float(weight.abs().max())
        self.summation_margin = SUMMATION_MARGIN_PER_CHANNEL * k
        self.num_rows = 0  # rows whose tokens came through `greedy` so far
        logger.info("greedy rows: exact argmax through an 8-bit screening copy of the output head (%.1f MiB)",
                    self.screen.weight_bytes / 2**20)

    @staticmethod
    def supports(head: torch.nn.Module) -> bool:
        return (isinstance(head, StreamLinear) and head.bits in (16, 32) and head.group is None
                and head.weight is not None and head.bias is None and head.weight.device.type == "cpu"
                and head.in_features % ACT_CHUNK == 0 and head.out_features % LANES == 0 and cpu_kernels.loaded())

    def bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x [M, K] float32/bfloat16 -> (screened logits a, bound b), each [M, V] float32: |exact_v - a_v| <= b_v;
        None when x is not finite (no bound holds) or not float32/bfloat16."""
        xf = x.float()
        if x.dtype not in (torch.float32, torch.bfloat16) or not bool(torch.isfinite(xf).all()):
            return None
        a, d = quantize_activations(xf)  # what the screening kernel multiplies with, bit for bit
        rounded = (a.double().view(x.shape[0], -1, ACT_BLOCK) * d.double().unsqueeze(-1)).view(xf.shape)
        coef = torch.stack([xf.double().norm(dim=-1), (xf.double() - rounded).norm(dim=-1)], 1) * NORM_SLACK  # [M, 2]
        margin = (self.summation_margin * self.max_abs_weight) * xf.abs().sum(-1, keepdim=True)  # [M, 1]
        screened = torch.ops.loraplex_cpu.stream_linear(xf, self.screen.weight, self.screen.scales,
                                                        self.screen.kernel_zeros, self.screen.kind, GROUP, None)
        return screened, torch.addmm(margin, coef.float(), self.norms)

    def candidates(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] -> the vocabulary rows that may hold some row's greedy token, ascending ([n] int64); None when
        x is not finite (no bound holds) or not float32/bfloat16."""
        found = self.bounds(x)
        if found is None:
            return None
        screened, bound = found
        floor = (screened - bound).amax(-1, keepdim=True)  # [M, 1]: no row's exact maximum is below it
        if x.dtype == torch.bfloat16:  # the head's logits are bfloat16 (x's dtype)
            floor = floor - floor.abs() * BF16_TIE
        return (screened + bound >= floor).any(0).nonzero().squeeze(1)

    def greedy(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] (the head's input rows) -> greedy token ids [M], equal to `greedy(head(x))`, in one kernel call
        (engine/kernels/csrc/cpu_greedy_head.cpp); None when x is not finite or not float32/bfloat16 (compute the
        logits instead)."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            return None
        s = self.screen
        ids = torch.ops.loraplex_cpu.screened_greedy(x, self.head.weight, s.weight, s.scales, s.kernel_zeros, s.kind,
                                                     GROUP, self.norms, self.max_abs_weight, self.summation_margin,
                                                     NORM_SLACK, BF16_TIE)
        if ids.numel() != x.shape[0]:
            return None
        self.num_rows += x.shape[0]
        return ids

    def reference_greedy(self, x: torch.Tensor) -> torch.Tensor | None:
        """`greedy` in plain torch: `candidates`, then the dense kernel on those rows and their argmax."""
        rows = self.candidates(x)
        if rows is None:
            return None
        weight = self.head.weight.index_select(0, rows)  # [n, K]
        exact = torch.ops.loraplex_cpu.stream_linear(x.contiguous(), weight, None, None, 0, 0, None)  # [M, n]
        return rows[greedy(exact)]
