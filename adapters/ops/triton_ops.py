"""Triton kernels for the batched LoRA op over the paged pool (S-LoRA / punica "sgmv" style), with the
semantics of ops/reference.py: shrink h = A[pages] · x, expand y += h · B[pages].

Each program owns one tile of one segment's tokens and, for expand, one tile of output features, for
shrink one slice of the input features (split-K: a decode batch has one token tile per segment, too few
programs to read the A pages at full bandwidth; the slices' partial sums are added up after). It loads
the segment's page ids once, gathers those rank-rows of A / B from the pool (pages are not contiguous),
gathers its token rows of x / y (rows are not contiguous either) and multiplies with tl.dot,
accumulating in fp32. Slots past a segment's rank are masked off, so a rank-4 adapter in a batch
padded to rank 64 reads only its 4 pages.

Imports without triton (HAS_TRITON is then False and the ops raise RuntimeError): CI has no GPU.
"""
from __future__ import annotations

import torch

from loraplex.adapters.ops.meta import LoRABatchMeta

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference / CPU ops serve instead
    triton = None
    tl = None

HAS_TRITON = triton is not None

# The rank is the dot's N (shrink) or K (expand) dimension; tl.dot needs each dimension >= 16.
# Block sizes from a sweep on an H100 (bf16, in/out 4096/4096 and 4096/14336, ranks 16 and 64, decode
# and 2048-token prefill, timed in CUDA graphs): BLOCK_M 64 with a rank-64 expand spills registers
# (~1.6x slower); BLOCK_K 32/64/128 and BLOCK_N 64/128 were within a few percent except the large
# expand, where BLOCK_N 128 was 1.4x faster.
MIN_DOT_BLOCK = 16
MAX_BLOCK_M = 32
SHRINK_BLOCK_K = 64
EXPAND_BLOCK_N = 128
SHRINK_MIN_PROGRAMS = 256  # split K until the shrink has about this many programs (~2 per SM)
# Expand into a 16-bit y: "tf32" runs h · B on the tensor cores. B's 16-bit values are exact in tf32 and
# h loses bits below 2^-10 of its value, less than y's own rounding for bf16 and about as much for fp16.
# "ieee" (fp32 FMA, used for fp32 y) made the expand ~2x slower on an H100 (rank 64: 256 decode tokens
# into 4096 outputs, 2048 prefill tokens into 14336). The interpreter ignores it.
EXPAND_16BIT_PRECISION = "tf32"

if HAS_TRITON:

    @triton.jit
    def _lora_shrink_kernel(
        x_ptr, a_ptr, h_ptr, token_rows_ptr, seg_starts_ptr, seg_pages_ptr, seg_ranks_ptr,
        in_features, max_rank, k_per_split,
        stride_xm, stride_xk, stride_ap, stride_ak, stride_hs, stride_hm, stride_hr, stride_sp,
        DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        seg = tl.program_id(0)
        seg_start = tl.load(seg_starts_ptr + seg)
        seg_end = tl.load(seg_starts_ptr + seg + 1)
        tile_start = seg_start + tl.program_id(1) * BLOCK_M
        if tile_start >= seg_end:  # the grid is sized for the longest segment
            return
        offs_m = tile_start + tl.arange(0, BLOCK_M)  # positions in token_rows
        mask_m = offs_m < seg_end
        rows = tl.load(token_rows_ptr + offs_m, mask=mask_m, other=0)  # [BLOCK_M] batch rows, int64
        offs_r = tl.arange(0, BLOCK_R)
        rank = tl.load(seg_ranks_ptr + seg)
        mask_r = offs_r < rank
        pages = tl.load(seg_pages_ptr + seg * stride_sp + offs_r, mask=mask_r, other=0)  # [BLOCK_R]

        split = tl.program_id(2)
        k_begin = split * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, in_features)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k_start in range(k_begin, k_end, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_end
            x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                             mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            a_tile = tl.load(a_ptr + pages[None, :] * stride_ap + offs_k[:, None] * stride_ak,
                             mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
            acc += tl.dot(x_tile.to(DOT_DTYPE), a_tile.to(DOT_DTYPE), input_precision="ieee")

        # columns in [rank, max_rank) are written as zeros, the value the zero page gives the reference
        h_ptrs = h_ptr + split * stride_hs + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
        tl.store(h_ptrs, acc, mask=mask_m[:, None] & (offs_r[None, :] < max_rank))

    @triton.jit
    def _lora_expand_kernel(
        y_ptr, h_ptr, b_ptr, token_rows_ptr, seg_starts_ptr, seg_pages_ptr, seg_ranks_ptr,
        out_features,
        stride_ym, stride_yn, stride_hm, stride_hr, stride_bp, stride_bn, stride_sp,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        seg = tl.program_id(0)
        seg_start = tl.load(seg_starts_ptr + seg)
        seg_end = tl.load(seg_starts_ptr + seg + 1)
        tile_start = seg_start + tl.program_id(1) * BLOCK_M
        if tile_start >= seg_end:
            return
        offs_m = tile_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_end
        rows = tl.load(token_rows_ptr + offs_m, mask=mask_m, other=0)  # [BLOCK_M]
        offs_r = tl.arange(0, BLOCK_R)
        rank = tl.load(seg_ranks_ptr + seg)
        mask_r = offs_r < rank
        pages = tl.load(seg_pages_ptr + seg * stride_sp + offs_r, mask=mask_r, other=0)  # [BLOCK_R]
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < out_features

        h_tile = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
        b_tile = tl.load(b_ptr + pages[:, None] * stride_bp + offs_n[None, :] * stride_bn,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        # h is fp32, so the product is fp32 too, as in the reference (see EXPAND_16BIT_PRECISION)
        delta = tl.dot(h_tile.to(tl.float32), b_tile.to(tl.float32), input_precision=DOT_PRECISION)

        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask_y = mask_m[:, None] & mask_n[None, :]
        y_tile = tl.load(y_ptrs, mask=mask_y, other=0.0)
        # rows are distinct across segments (build_lora_meta checks), so no two programs share a y element
        tl.store(y_ptrs, (y_tile.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask_y)

    # Under TRITON_INTERPRET=1 the kernels are interpreted (numpy), and the interpreter's bf16 tl.dot
    # multiplies the raw uint16 bit patterns (triton-lang/triton#11584, "not supported yet"), so there
    # bf16 tiles are multiplied in fp32, which gives the same products.
    _INTERPRETED = not isinstance(_lora_shrink_kernel, triton.runtime.JITFunction)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton LoRA ops need triton (pip install 'loraplex[dev]' on Linux x86-64)")


def _block_sizes(meta: LoRABatchMeta) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_R, number of token tiles of the longest segment), once per step."""
    cached = meta.cache.get("triton")
    if cached is None:
        starts = meta.seg_starts_list
        max_seg_len = max(end - start for start, end in zip(starts[:-1], starts[1:]))
        block_m = min(MAX_BLOCK_M, max(MIN_DOT_BLOCK, triton.next_power_of_2(max_seg_len)))
        block_r = max(MIN_DOT_BLOCK, triton.next_power_of_2(meta.max_rank))
        cached = meta.cache["triton"] = (block_m, block_r, triton.cdiv(max_seg_len, block_m))
    return cached


def _dot_dtype(x: torch.Tensor, a_pool: torch.Tensor):
    """16-bit operands go to the tensor cores as they are (their products are exact in fp32);
    anything else, mixed dtypes included, is multiplied in fp32."""
    if x.dtype == a_pool.dtype == torch.bfloat16 and not _INTERPRETED:
        return tl.bfloat16
    if x.dtype == a_pool.dtype == torch.float16:
        return tl.float16
    return tl.float32


def _check_device(meta: LoRABatchMeta, *tensors: torch.Tensor) -> None:
    device = meta.token_rows.device
    if any(t.device != device for t in tensors):
        raise ValueError(f"LoRA op tensors must all be on {device} (the meta's device)")


def lora_shrink_triton(x: torch.Tensor, a_pool: torch.Tensor, meta: LoRABatchMeta) -> torch.Tensor:
    """x [num_tokens, in], a_pool [num_pages, in] -> h [num_lora_tokens, max_rank] float32,
    h[i] = A[pages of token_rows[i]] @ x[token_rows[i]] (rows in token_rows order)."""
    _require_triton()
    _check_device(meta, x, a_pool)
    if x.shape[1] != a_pool.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features but the A pool has {a_pool.shape[1]}")
    block_m, block_r, num_m_tiles = _block_sizes(meta)
    in_features = x.shape[1]
    num_k_blocks = triton.cdiv(in_features, SHRINK_BLOCK_K)
    num_tiles = meta.num_segments * num_m_tiles
    split_k = min(num_k_blocks, max(1, SHRINK_MIN_PROGRAMS // num_tiles))
    k_per_split = triton.cdiv(num_k_blocks, split_k) * SHRINK_BLOCK_K
    split_k = triton.cdiv(in_features, k_per_split)  # no empty slices
    # [split_k, num_lora_tokens, max_rank] partial sums, added up in a fixed order (deterministic)
    h = torch.empty(split_k, meta.num_lora_tokens, meta.max_rank, dtype=torch.float32, device=x.device)
    grid = (meta.num_segments, num_m_tiles, split_k)
    _lora_shrink_kernel[grid](
        x, a_pool, h, meta.token_rows, meta.seg_starts, meta.seg_pages, meta.seg_ranks,
        in_features, meta.max_rank, k_per_split,
        x.stride(0), x.stride(1), a_pool.stride(0), a_pool.stride(1), h.stride(0), h.stride(1), h.stride(2),
        meta.seg_pages.stride(0),
        DOT_DTYPE=_dot_dtype(x, a_pool), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K,
    )
    return h[0] if split_k == 1 else h.sum(dim=0)


def lora_expand_triton(y: torch.Tensor, h: torch.Tensor, b_pool: torch.Tensor, meta: LoRABatchMeta) -> None:
    """y [num_tokens, out] += h @ B[pages] for each LoRA row, in place; b_pool [num_pages, out]."""
    _require_triton()
    _check_device(meta, y, h, b_pool)
    if y.shape[1] != b_pool.shape[1]:
        raise ValueError(f"y has {y.shape[1]} features but the B pool has {b_pool.shape[1]}")
    if h.shape != (meta.num_lora_tokens, meta.max_rank):
        raise ValueError(f"h is {tuple(h.shape)}, expected {(meta.num_lora_tokens, meta.max_rank)}")
    block_m, block_r, num_m_tiles = _block_sizes(meta)
    out_features = y.shape[1]
    grid = (meta.num_segments, num_m_tiles, triton.cdiv(out_features, EXPAND_BLOCK_N))
    _lora_expand_kernel[grid](
        y, h, b_pool, meta.token_rows, meta.seg_starts, meta.seg_pages, meta.seg_ranks,
        out_features,
        y.stride(0), y.stride(1), h.stride(0), h.stride(1), b_pool.stride(0), b_pool.stride(1),
        meta.seg_pages.stride(0),
        DOT_PRECISION="ieee" if y.dtype == torch.float32 else EXPAND_16BIT_PRECISION,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=EXPAND_BLOCK_N,
    )


def lora_apply_triton(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
                      meta: LoRABatchMeta) -> None:
    """y += scale · B[a] · (A[a] · x) for every row's adapter a (the scale is folded into b_pool); page and row
    scales (meta.h_scales) multiply h between the two kernels."""
    h = lora_shrink_triton(x, a_pool, meta)
    scales = meta.h_scales()
    lora_expand_triton(y, h if scales is None else h.mul_(scales), b_pool, meta)
