"""EXL2 (exllamav2) weights in plain torch: bit-stream packing, RTN quantization, dequantization, a reference
linear, and an exporter that writes a Hugging Face folder in the layout exllamav2 reads.

References (exllamav2 0.3.2): `conversion/adaptivegptq.py` (AdaptiveQuantizer.find_params: per-column
scales as 4-bit multiples of a per-group maximum; AdaptiveGPTQ.pack: tensor names, column padding to 32,
q_groups), `exllamav2_ext/cuda/pack_tensor.cu` (pack_rows_4: scales stored minus one; pack_columns: the
value bit streams), `exllamav2_ext/cuda/util.cuh` and `quant/qdq_util.cuh` (dq_scale: (qs + 1)^2 * max),
`exllamav2/ext.py` (make_q_matrix: q_scale_max *= 1/256 in fp16; q_perm = argsort(q_invperm) in
`module.py`), `exllamav2_ext/cuda/q_matrix.cu` (groups decoded by bits, highest first; b[perm[k]] = dq[k]).

Layout per linear `<prefix>`, K = in_features (rows), N = out_features, N_pad = N rounded up to 32:
    q_weight    int32 [qrows, N_pad]  group g: rows_g rows of bits_g-bit values, rows_g * bits_g / 32 words
                                      per column; value i of a run of 32 at bits [i*bits, (i+1)*bits) of
                                      `bits` consecutive words (word 0 lowest). Padded columns hold 2^(bits-1).
    q_groups    int16 [2G]            (bits_g, first q_weight row of group g); the last group ends at K
    q_scale     int32 [G, N_pad / 8]  4-bit qscale - 1 along the columns (nibble i of word c = column 8c + i)
    q_scale_max fp16  [G]
    q_invperm   int32 [K]             (exllamav2 loads it as int16; q_perm = argsort(q_invperm) is optional)
    scale[g, n] = fp16(qscale^2 * fp16(q_scale_max[g] / 256))   (exactly the kernel's fp16 arithmetic)
    Qd[k, n]    = (q[k, n] - 2^(bits_g - 1)) * scale[g(k), n]   rows in quantization (permuted) order
    W           = Qd[q_invperm, :N].T                            [N, K]
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import QUANTIZED_WEIGHT, export_quantized, pack_int, unpack_int

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
TENSOR_SUFFIXES = ("q_weight", "q_groups", "q_scale", "q_scale_max", "q_invperm", "q_perm")  # of one linear
FORMAT_VERSION = "0.3.2"  # the exllamav2 release whose layout this writes
UNQUANTIZED_HEAD_BITS = 16  # head_bits meaning "lm_head stays dense", as exllamav2's converter says it
SCALE_PRESCALE = 1 / 256  # make_q_matrix's multiplier on q_scale_max (exact in fp16)
P_GRID_RANGE = (0.7, 1.2)  # AdaptiveQuantizer.min_p, max_p
P_SEARCH_NORM = 3.5  # AdaptiveQuantizer.norm: the error power summed in the p search
DEFAULT_P_GRID = 96  # AdaptiveQuantizer.p_grid


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"EXL2 bits must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def _num_words(num_rows: int, bits: int) -> int:
    return -(-num_rows * bits // 32)


def _bit_positions(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For value i of a run of 32: the word it starts in and its shift in that word, each [32]."""
    offset = torch.arange(32, device=device) * bits
    return offset // 32, offset % 32


def pack_exl2_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [0, 2**bits) [rows, N] -> int32 [ceil(rows * bits / 32), N]: each run of 32 rows becomes a
    little-endian bit stream over `bits` words per column (pack_columns; GPTQ's packing for 2/4/8 bits)."""
    _check_bits(bits)
    rows, columns = values.shape
    runs = -(-rows // 32)
    v = F.pad(values.to(torch.int64) & (2**bits - 1), (0, 0, 0, runs * 32 - rows))  # [runs * 32, N]
    v = v.reshape(runs, 32, columns)  # [runs, 32, N]
    word, shift = _bit_positions(bits, v.device)
    shift = shift[None, :, None]
    words = torch.zeros(runs, bits + 1, columns, dtype=torch.int64, device=v.device)  # one spare word for carries
    words.index_add_(1, word, (v << shift) & 0xFFFFFFFF)  # bit fields never overlap: add is or
    words.index_add_(1, word + 1, v >> (32 - shift))  # the part spilling into the next word (0 if none)
    words = words[:, :bits].reshape(runs * bits, columns)[:_num_words(rows, bits)]  # [qrows, N]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed int32


def unpack_exl2_rows(q_weight_rows: torch.Tensor, bits: int, num_rows: int) -> torch.Tensor:
    """Inverse of `pack_exl2_rows`: int32 [ceil(num_rows * bits / 32), N] -> int32 [num_rows, N] in [0, 2**bits)."""
    _check_bits(bits)
    qrows, columns = q_weight_rows.shape
    if qrows != _num_words(num_rows, bits):
        raise ValueError(f"{num_rows} rows of {bits}-bit values take {_num_words(num_rows, bits)} int32 rows, "
                         f"got {qrows}")
    runs = -(-num_rows // 32)
    words = F.pad(q_weight_rows.to(torch.int64) & 0xFFFFFFFF, (0, 0, 0, runs * bits - qrows))  # unsigned
    words = words.reshape(runs, bits, columns)  # [runs, bits, N]
    pairs = words | (F.pad(words[:, 1:], (0, 0, 0, 1)) << 32)  # [runs, bits, N]: word w, then w + 1 (0 at the end)
    word, shift = _bit_positions(bits, words.device)
    v = (pairs[:, word] >> shift[None, :, None]) & (2**bits - 1)  # [runs, 32, N]
    return v.reshape(runs * 32, columns)[:num_rows].to(torch.int32)


def _group_layout(q_groups: torch.Tensor, num_qrows: int, in_features: int) -> tuple[tuple[int, int, int], ...]:
    """q_groups [2G] -> ((bits, first q_weight row, rows), ...) per group, validated against q_weight and K."""
    pairs = [int(x) & 0xFFFF for x in q_groups.reshape(-1).tolist()]  # the kernels read uint16
    if not pairs or len(pairs) % 2:
        raise ValueError(f"EXL2 q_groups must hold (bits, q_weight row) pairs, got {len(pairs)} values")
    bits, starts = pairs[0::2], pairs[1::2]
    if starts[0] != 0:
        raise ValueError(f"EXL2 q_groups: the first group starts at q_weight row {starts[0]}, expected 0")
    layout, row = [], 0
    for g, (b, start) in enumerate(zip(bits, starts, strict=True)):
        _check_bits(b)
        if g + 1 < len(bits):
            qrows = starts[g + 1] - start
            if qrows <= 0 or qrows * 32 % b:
                raise ValueError(f"EXL2 group {g}: {qrows} q_weight rows is not a whole number of {b}-bit rows")
            rows = qrows * 32 // b
        else:
            rows = in_features - row
            if rows <= 0:
                raise ValueError(f"EXL2 groups before the last cover {row} rows, but in_features is {in_features}")
            if num_qrows - start != _num_words(rows, b):
                raise ValueError(f"EXL2 q_weight has {num_qrows} rows; groups covering {in_features} input "
                                 f"features need {start + _num_words(rows, b)}")
        layout.append((b, start, rows))
        row += rows
    return tuple(layout)


def _scales(q_scale: torch.Tensor, q_scale_max: torch.Tensor) -> torch.Tensor:
    """[G, N_pad / 8] packed qscale - 1, [G] -> fp32 [G, N_pad], rounded exactly as the fp16 kernel rounds."""
    qscale = unpack_int(q_scale, 4, dim=1) + 1  # [G, N_pad] in [1, 16]
    max_scale = q_scale_max.to(torch.float16).reshape(-1, 1) * SCALE_PRESCALE  # fp16, as make_q_matrix
    return ((qscale * qscale).to(torch.float16) * max_scale).float()  # one fp16 rounding, as dq_scale


def _dequantize(q_weight: torch.Tensor, layout: tuple[tuple[int, int, int], ...], q_scale: torch.Tensor,
                q_scale_max: torch.Tensor, q_invperm: torch.Tensor, out_features: int,
                dtype: torch.dtype) -> torch.Tensor:
    values, start = [], 0
    while start < len(layout):  # consecutive groups of equal bits form one bit stream: unpack them at once
        end = start
        while end + 1 < len(layout) and layout[end + 1][0] == layout[start][0]:
            end += 1
        bits, first, _ = layout[start]
        last = layout[end + 1][1] if end + 1 < len(layout) else q_weight.shape[0]
        values.append(unpack_exl2_rows(q_weight[first:last], bits, sum(r for _, _, r in layout[start:end + 1])))
        start = end + 1
    q = torch.cat(values)  # [K, N_pad], permuted row order
    rows = torch.tensor([r for _, _, r in layout], device=q.device)
    group = torch.repeat_interleave(torch.arange(len(layout), device=q.device), rows)  # [K]
    zero = torch.tensor([2 ** (b - 1) for b, _, _ in layout], device=q.device)[group]  # [K]
    qd = (q - zero[:, None]).float() * _scales(q_scale, q_scale_max)[group]  # [K, N_pad]
    return qd[q_invperm.long() & 0xFFFF, :out_features].t().to(dtype)  # [N, K]; int16 invperm read as uint16


def dequantize_exl2(tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One linear's EXL2 tensors (keys q_weight, q_groups, q_scale, q_scale_max, q_invperm) -> W [out, in],
    computed in fp32 from the fp16-rounded scales, then cast."""
    layout = _group_layout(tensors["q_groups"], tensors["q_weight"].shape[0], in_features)
    return _dequantize(tensors["q_weight"], layout, tensors["q_scale"], tensors["q_scale_max"], tensors["q_invperm"],
                       out_features, dtype)


def _bits_per_group(bits: int | Sequence[int], num_groups: int) -> list[int]:
    group_bits = [bits] * num_groups if isinstance(bits, int) else [int(b) for b in bits]
    if len(group_bits) != num_groups:
        raise ValueError(f"{len(group_bits)} bit widths given for {num_groups} groups")
    for b in group_bits:
        _check_bits(b)
    if group_bits != sorted(group_bits, reverse=True):
        raise ValueError(f"EXL2 group bits must run from highest to lowest (exllamav2 decodes 8-bit rows, then "
                         f"6, 5, 4, 3, 2), got {group_bits}")
    return group_bits


def quantize_exl2_rtn(weight: torch.Tensor, bits: int | Sequence[int] = 4, group_size: int = 32,
                      perm: torch.Tensor | None = None, p_grid: int = 0) -> dict[str, torch.Tensor]:
    """Round-to-nearest EXL2 quantization of `weight` [out, in] -> {q_weight, q_groups, q_scale, q_scale_max,
    q_invperm}, with AdaptiveQuantizer.find_params's scales (no Hessian, no error feedback).

    bits: one width for every group, or one per group (highest first, as exllamav2's kernels need).
    perm [in]: input channels in the order they are quantized (exllamav2 sorts by Hessian diagonal);
    default the identity. group_size must be a multiple of 32: the kernels switch groups on 32-row steps.
    p_grid: 0 keeps every group's scales at p = 1; otherwise each group's scales are multiplied by the p among
    p_grid + 1 values in [0.7, 1.2] with the least sum of |error|^3.5, as find_params does (exllamav2: 96)."""
    out_features, in_features = weight.shape
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"EXL2 group_size must be a positive multiple of 32, got {group_size}")
    if p_grid < 0:
        raise ValueError(f"p_grid must be >= 0, got {p_grid}")
    num_groups = -(-in_features // group_size)
    group_bits = _bits_per_group(bits, num_groups)
    device = weight.device
    if perm is None:
        perm = torch.arange(in_features, device=device)
    elif sorted(perm.tolist()) != list(range(in_features)):
        raise ValueError(f"perm must be a permutation of range({in_features})")
    n_pad = -(-out_features // 32) * 32
    x = weight.detach().float().t()[perm.long()]  # [K, N], quantization order
    x = F.pad(x, (0, 0, 0, num_groups * group_size - in_features)).reshape(num_groups, group_size, out_features)
    maxq = torch.tensor([2**b - 1 for b in group_bits], device=device, dtype=torch.float32)[:, None]  # [G, 1]
    base_scale = (x.abs().amax(dim=1) + 1e-12) / (maxq / 2)  # [G, N]; zero padding rows change no maximum
    qscale_max = base_scale.amax(dim=1, keepdim=True)  # [G, 1]
    qscale = torch.clamp(torch.round(torch.sqrt(base_scale / qscale_max) * 16), 1, 16)  # [G, N]
    if p_grid:
        qscale_max = qscale_max * _best_p(x, (qscale / 16).square() * qscale_max, maxq, p_grid)
    q_scale_max = qscale_max.reshape(-1).to(torch.float16)  # [G]
    qscale = F.pad(qscale, (0, n_pad - out_features), value=16)  # exllamav2's padded columns unpack to 16
    q_scale = pack_int(qscale.to(torch.int32) - 1, 4, dim=1)  # [G, N_pad / 8]
    scale = _scales(q_scale, q_scale_max)  # [G, N_pad], as the kernel computes it
    zero = (maxq + 1) / 2  # [G, 1]
    q = torch.round(x / scale[:, None, :out_features] + zero[:, None])  # [G, gs, N]
    q = q.clamp(min=0).minimum(maxq[:, None])
    q = torch.cat([q, zero[:, None].expand(-1, group_size, n_pad - out_features)], 2)  # [G, gs, N_pad]
    q = q.reshape(-1, n_pad)[:in_features].to(torch.int32)  # [K, N_pad]
    words, q_groups, qrow = [], [], 0
    for b in sorted(set(group_bits), reverse=True):  # each run of equal bits packs as one bit stream
        first = group_bits.index(b)
        count = group_bits.count(b)
        rows = q[first * group_size:min((first + count) * group_size, in_features)]
        for g in range(count):
            q_groups += [b, qrow + g * group_size * b // 32]
        words.append(pack_exl2_rows(rows, b))
        qrow += words[-1].shape[0]
    return {
        "q_weight": torch.cat(words),  # [qrows, N_pad]
        "q_groups": torch.tensor(q_groups, dtype=torch.int16, device=device),  # [2G]
        "q_scale": q_scale,  # [G, N_pad / 8]
        "q_scale_max": q_scale_max,  # [G]
        "q_invperm": torch.argsort(perm.long()).to(torch.int32),  # [K]
    }


def _best_p(x: torch.Tensor, scale: torch.Tensor, maxq: torch.Tensor, p_grid: int) -> torch.Tensor:
    """x [G, gs, N], unrounded scales [G, N], maxq [G, 1] -> [G, 1]: per group the first p of the grid with the
    least sum |round-and-clamp(x / (p * scale)) * p * scale - x|^3.5 (exllamav2's quantize_err kernel)."""
    zero = ((maxq + 1) / 2)[:, None]  # [G, 1, 1]
    min_p, max_p = P_GRID_RANGE
    best_err = best_p = None
    for i in range(p_grid + 1):
        p = max_p * i / p_grid + min_p * (1 - i / p_grid)
        s = (scale * p)[:, None]  # [G, 1, N]
        q = torch.round(x / s).clamp(min=-zero).minimum(maxq[:, None] - zero)  # [G, gs, N], centred
        err = (q * s - x).abs().pow(P_SEARCH_NORM).sum(dim=(1, 2))  # [G]
        if best_err is None:
            best_err, best_p = err, torch.full_like(err, p)
        else:
            better = err < best_err  # strict: the first minimum wins, as torch.argmin
            best_err, best_p = torch.where(better, err, best_err), torch.where(better, p, best_p)
    return best_p[:, None]


def exl2_param_names(prefix: str, bias: bool = False) -> list[str]:
    """Checkpoint tensor names of one EXL2 linear as exllamav2's converter writes them."""
    names = ("q_weight", "q_groups", "q_scale", "q_scale_max", "q_invperm", *(("bias",) if bias else ()))
    return [f"{prefix}.{n}" for n in names]


class EXL2Linear(nn.Module):
    """y = x @ dequantize_exl2(...).T + b, in x's dtype. The plain-torch reference exllamav2's kernels are checked
    against. Nothing is cached; gradients flow to x only (the quantized tensors are buffers)."""

    def __init__(self, q_weight: torch.Tensor, q_groups: torch.Tensor, q_scale: torch.Tensor,
                 q_scale_max: torch.Tensor, q_invperm: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n_pad = -(-out_features // 32) * 32
        if q_weight.dim() != 2 or q_weight.shape[1] != n_pad:
            raise ValueError(f"EXL2 q_weight has shape {tuple(q_weight.shape)}, expected [*, {n_pad}] "
                             f"(out_features {out_features} padded to a multiple of 32)")
        self.layout = _group_layout(q_groups, q_weight.shape[0], in_features)
        self.group_bits = tuple(b for b, _, _ in self.layout)
        self.group_rows = tuple(r for _, _, r in self.layout)
        _bits_per_group(list(self.group_bits), len(self.layout))  # the kernels' order: highest bits first
        num_groups = len(self.layout)
        expected = {"q_scale": (num_groups, n_pad // 8), "q_scale_max": (num_groups,), "q_invperm": (in_features,)}
        for name, tensor in (("q_scale", q_scale), ("q_scale_max", q_scale_max), ("q_invperm", q_invperm)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"EXL2 {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        invperm = q_invperm.to(torch.int32) & 0xFFFF  # exllamav2 treats int16 permutations as uint16
        if not torch.equal(torch.sort(invperm).values.cpu(), torch.arange(in_features, dtype=torch.int32)):
            raise ValueError(f"EXL2 q_invperm is not a permutation of range({in_features})")
        if bias is not None:
            if tuple(bias.shape) not in ((out_features,), (n_pad,)):
                raise ValueError(f"EXL2 bias has shape {tuple(bias.shape)}, expected ({out_features},)")
            bias = bias.detach()[:out_features].to(torch.float16)
        self.register_buffer("q_weight", q_weight.to(torch.int32))
        self.register_buffer("q_groups", q_groups.to(torch.int16).reshape(-1))
        self.register_buffer("q_scale", q_scale.to(torch.int32))
        self.register_buffer("q_scale_max", q_scale_max.to(torch.float16))
        self.register_buffer("q_invperm", invperm)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int | Sequence[int] = 4, group_size: int = 32,
                    perm: torch.Tensor | None = None) -> EXL2Linear:
        tensors = quantize_exl2_rtn(linear.weight, bits, group_size, perm)
        return cls(**tensors, in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], in_features: int, out_features: int,
                     bias: torch.Tensor | None = None) -> EXL2Linear:
        """From checkpoint tensors keyed q_weight/q_groups/q_scale/q_scale_max/q_invperm (q_perm, if present,
        must be argsort(q_invperm))."""
        missing = {"q_weight", "q_groups", "q_scale", "q_scale_max", "q_invperm"} - set(tensors)
        if missing:
            raise ValueError(f"EXL2 tensors lack {sorted(missing)}")
        q = cls(tensors["q_weight"], tensors["q_groups"], tensors["q_scale"], tensors["q_scale_max"],
                tensors["q_invperm"], in_features, out_features, bias)
        perm = tensors.get("q_perm")
        if perm is not None and not torch.equal((perm.to(torch.int64) & 0xFFFF)[q.q_invperm.long()].cpu(),
                                                torch.arange(in_features)):
            raise ValueError("EXL2 q_perm is not the inverse of q_invperm")
        return q

    @property
    def bits_per_weight(self) -> float:
        """Average bits of the quantized values (scales and permutation not counted)."""
        return sum(b * r for b, r in zip(self.group_bits, self.group_rows)) / self.in_features

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [out, in]
        return _dequantize(self.q_weight, self.layout, self.q_scale, self.q_scale_max, self.q_invperm,
                           self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    @property
    def weight_bytes(self) -> int:
        """Bytes of q_weight + q_groups + q_scale + q_scale_max + q_invperm (bias not counted)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.q_weight, self.q_groups, self.q_scale, self.q_scale_max, self.q_invperm))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits_per_weight={self.bits_per_weight:.2f}, groups={len(self.layout)}, bias={self.bias is not None}")


def quantization_config(bits: float, head_bits: int, group_size: int) -> dict:
    """config.json's quantization_config; "calibration": None says RTN (exllamav2 records its data set there)."""
    return {"quant_method": "exl2", "version": FORMAT_VERSION, "bits": float(bits), "head_bits": head_bits,
            "group_size": group_size, "calibration": None}


def export_exl2(model_dir: str | Path, out_dir: str | Path, bits: int = 4, group_size: int = 32,
                head_bits: int = UNQUANTIZED_HEAD_BITS, p_grid: int = DEFAULT_P_GRID,
                progress: Callable[[str], None] | None = None) -> Path:
    """Quantize every decoder-layer `*_proj.weight` of a Hugging Face folder with RTN and write an EXL2 folder
    (model.safetensors, config.json with quantization_config, tokenizer and other files). An untied lm_head is
    quantized too when head_bits is not 16; a tied one stays the embedding. p_grid: see quantize_exl2_rtn.
    `progress` gets one line per decoder layer. Returns out_dir."""
    _check_bits(bits)
    if head_bits != UNQUANTIZED_HEAD_BITS:
        _check_bits(head_bits)
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"EXL2 group_size must be a positive multiple of 32, got {group_size}")
    quantized_head = False

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        nonlocal quantized_head
        if QUANTIZED_WEIGHT.match(name):
            return quantize_exl2_rtn(tensor, bits, group_size, p_grid=p_grid)
        if name == "lm_head.weight" and head_bits != UNQUANTIZED_HEAD_BITS:
            quantized_head = True
            return quantize_exl2_rtn(tensor, head_bits, group_size, p_grid=p_grid)
        return None

    def qconfig() -> dict:  # asked after the weights are written: whether a head was there to quantize
        return quantization_config(bits, head_bits if quantized_head else UNQUANTIZED_HEAD_BITS, group_size)

    return export_quantized(model_dir, out_dir, quantize, qconfig, progress)

