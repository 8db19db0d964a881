"""The batched LoRA op: the CPU fast path against the plain-torch reference, and both against a
per-row loop written from the definition y += B[a] (A[a] x)."""
import contextlib
import random

import pytest
import torch

from loraplex.adapters.ops.cpu import LONG_SEGMENT_TOKENS, cpu_layout, lora_apply_cpu
from loraplex.adapters.ops.meta import ZERO_PAGE, build_lora_meta
from loraplex.adapters.ops.reference import lora_apply_ref
from loraplex.engine.kernels import cpu_kernels


def random_case(seed, num_tokens, in_f, out_f, ranks, seg_lens, num_pages=200, dtype=torch.float32,
                contiguous_long=True):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    a_pool = torch.randn(num_pages, in_f, generator=gen).to(dtype)
    b_pool = torch.randn(num_pages, out_f, generator=gen).to(dtype)
    a_pool[ZERO_PAGE] = 0
    b_pool[ZERO_PAGE] = 0
    free = list(range(1, num_pages))
    rng.shuffle(free)
    long_total = sum(n for n in seg_lens if n > LONG_SEGMENT_TOKENS and contiguous_long)
    cursor = num_tokens - long_total  # prefill chunks: contiguous rows at the end, as the runner lays them
    rows = list(range(cursor))
    rng.shuffle(rows)
    segments = []
    for rank, n in zip(ranks, seg_lens):
        if n > LONG_SEGMENT_TOKENS and contiguous_long:
            seg_rows, cursor = list(range(cursor, cursor + n)), cursor + n
        else:
            seg_rows, rows = rows[:n], rows[n:]
        segments.append((sorted(seg_rows), [free.pop() for _ in range(rank)]))
    x = torch.randn(num_tokens, in_f, generator=gen).to(dtype)
    y = torch.randn(num_tokens, out_f, generator=gen).to(dtype)
    return x, y, a_pool, b_pool, segments


def loop_reference(x, y, a_pool, b_pool, segments):
    out = y.clone().double()
    for rows, pages in segments:
        a, b = a_pool[pages].double(), b_pool[pages].double()  # [r, in], [r, out]
        for row in rows:
            out[row] += (a @ x[row].double()) @ b
    return out


CASES = {
    "decode-mixed-ranks": dict(num_tokens=40, in_f=64, out_f=48, ranks=[1, 4, 8, 16, 64], seg_lens=[3, 1, 9, 2, 5]),
    "odd-sizes": dict(num_tokens=23, in_f=37, out_f=100, ranks=[3, 7], seg_lens=[5, 11]),
    "long-prefill-and-decodes": dict(num_tokens=400, in_f=32, out_f=40, ranks=[8, 16, 4],
                                     seg_lens=[200, 3, 150]),
    "short-prefills-and-decodes": dict(num_tokens=90, in_f=32, out_f=40, ranks=[8, 16, 4],
                                       seg_lens=[40, 3, 30]),
    "one-adapter": dict(num_tokens=8, in_f=16, out_f=16, ranks=[8], seg_lens=[8]),
    "skewed-decodes": dict(num_tokens=70, in_f=24, out_f=24, ranks=[8, 8, 8], seg_lens=[60, 1, 1]),
}


def cpu_paths():
    """lora_apply_cpu with its torch ops, and with the C++ kernel where one is built."""
    yield "torch-ops", cpu_kernels.suspended()
    if cpu_kernels.available():
        yield "kernel", contextlib.nullcontext()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_and_reference_match_definition(case):
    x, y, a_pool, b_pool, segments = random_case(0, **CASES[case])
    meta = build_lora_meta(x.shape[0], segments)
    want = loop_reference(x, y, a_pool, b_pool, segments)
    got = y.clone()
    lora_apply_ref(got, x, a_pool, b_pool, meta)
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)
    untouched = sorted(set(range(x.shape[0])) - {r for rows, _ in segments for r in rows})
    for name, path in cpu_paths():
        got = y.clone()
        with path, torch.inference_mode():
            lora_apply_cpu(got, x, a_pool, b_pool, meta)
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4, msg=name)
        assert torch.equal(got[untouched], y[untouched]), name  # base-model rows are never written


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels not built (no C++ compiler)")
def test_kernel_writes_into_strided_outputs_and_refuses_bad_pages():
    """y may be a column slice of a fused q/k/v output; bad metadata is refused before any write."""
    x, y, a_pool, b_pool, segments = random_case(4, **CASES["decode-mixed-ranks"])
    meta = build_lora_meta(x.shape[0], segments)
    fused = torch.zeros(x.shape[0], y.shape[1] + 7)
    fused[:, 3:3 + y.shape[1]] = y
    view = fused[:, 3:3 + y.shape[1]]
    with torch.inference_mode():
        lora_apply_cpu(view, x, a_pool, b_pool, meta)
    torch.testing.assert_close(view.double(), loop_reference(x, y, a_pool, b_pool, segments), atol=1e-3, rtol=1e-4)
    assert not fused[:, :3].any() and not fused[:, 3 + y.shape[1]:].any()
    rows, starts, pages, ranks, page_scales, row_scales = cpu_layout(meta).kernel
    before = view.clone()
    with pytest.raises(RuntimeError, match="page out of range"):
        torch.ops.loraplex_cpu.lora_apply_(view, x, a_pool, b_pool, rows, starts, pages + a_pool.shape[0], ranks,
                                           page_scales, row_scales)
    with pytest.raises(RuntimeError, match="row_scales"):
        torch.ops.loraplex_cpu.lora_apply_(view, x, a_pool, b_pool, rows, starts, pages, ranks, page_scales,
                                           torch.ones(rows.numel() + 1))
    assert torch.equal(view, before)


def scaled_segments(segments, seed):
    """The same segments with a weight per page (several adapters summed) on some and a scale per row (each
    request's lora_scale) on others: (rows, pages, page_scales, row_scales)."""
    rng = random.Random(seed)
    out = []
    for i, (rows, pages) in enumerate(segments):
        page_scales = [rng.choice([0.5, -1.0, 2.0, 0.0]) for _ in pages] if i % 2 == 0 else None
        row_scales = [rng.choice([0.25, 1.0, 1.5, -0.5]) for _ in rows] if i % 3 != 1 else None
        out.append((rows, pages, page_scales, row_scales))
    return out


def scaled_loop_reference(x, y, a_pool, b_pool, segments):
    out = y.clone().double()
    for rows, pages, page_scales, row_scales in segments:
        a, b = a_pool[pages].double(), b_pool[pages].double()
        ps = torch.tensor(page_scales or [1.0] * len(pages), dtype=torch.float64)
        for j, row in enumerate(rows):
            out[row] += ((a @ x[row].double()) * ps * (row_scales[j] if row_scales else 1.0)) @ b
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_page_and_row_scales_match_definition(case):
    """y[row] += Σ_p row_scale · page_scale[p] · B[p] (A[p] x[row]) on every path, decodes and long prefills."""
    x, y, a_pool, b_pool, plain = random_case(7, **CASES[case])
    segments = scaled_segments(plain, 7)
    meta = build_lora_meta(x.shape[0], segments)
    assert meta.scaled
    want = scaled_loop_reference(x, y, a_pool, b_pool, segments)
    got = y.clone()
    lora_apply_ref(got, x, a_pool, b_pool, meta)
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)
    for name, path in cpu_paths():
        got = y.clone()
        with path, torch.inference_mode():
            lora_apply_cpu(got, x, a_pool, b_pool, build_lora_meta(x.shape[0], segments))
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4, msg=name)
    # all-ones scales are the unscaled op
    ones = [(r, p, [1.0] * len(p), [1.0] * len(r)) for r, p in plain]
    got, want = y.clone(), y.clone()
    lora_apply_ref(got, x, a_pool, b_pool, build_lora_meta(x.shape[0], ones))
    lora_apply_ref(want, x, a_pool, b_pool, build_lora_meta(x.shape[0], plain))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_long_contiguous_segments_take_the_dense_path():
    x, y, a_pool, b_pool, segments = random_case(1, **CASES["long-prefill-and-decodes"])
    layout = cpu_layout(build_lora_meta(x.shape[0], segments))
    assert len(layout.dense) == 2 and layout.bmm().num_segments == 1


def test_skewed_segments_are_split_to_bound_padding():
    x, y, a_pool, b_pool, segments = random_case(2, **CASES["skewed-decodes"])
    layout = cpu_layout(build_lora_meta(x.shape[0], segments, ))
    assert layout.bmm().num_segments * layout.bmm().seg_len < 2 * 62


def test_bfloat16_close_to_float32():
    x, y, a_pool, b_pool, segments = random_case(3, **CASES["decode-mixed-ranks"])
    meta = build_lora_meta(x.shape[0], segments)
    want = y.clone()
    lora_apply_ref(want, x, a_pool, b_pool, meta)
    for name, path in cpu_paths():
        got = y.bfloat16()
        with path, torch.inference_mode():
            lora_apply_cpu(got, x.bfloat16(), a_pool.bfloat16(), b_pool.bfloat16(), meta)
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want).abs().max() / want.abs().max()) < 0.02, name


def test_meta_validation():
    assert build_lora_meta(4, []) is None
    assert build_lora_meta(4, [([], [1])]) is None
    with pytest.raises(ValueError):
        build_lora_meta(4, [([0, 1], [1]), ([1], [2])])  # row in two segments
    with pytest.raises(ValueError):
        build_lora_meta(4, [([4], [1])])  # row out of range
    meta = build_lora_meta(6, [([1, 3], [5, 6, 7]), ([4], [9])])
    assert meta.max_rank == 3 and meta.seg_pages.tolist() == [[5, 6, 7], [9, ZERO_PAGE, ZERO_PAGE]]
    assert meta.token_pages().tolist() == [[5, 6, 7], [5, 6, 7], [9, 0, 0]]
    assert not meta.scaled and meta.h_scales() is None
    meta = build_lora_meta(6, [([1, 3], [5, 6, 7], [1.0, 0.5, 2.0], None), ([4], [9], None, [3.0])])
    assert meta.h_scales().tolist() == [[1.0, 0.5, 2.0], [1.0, 0.5, 2.0], [3.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="one value per page"):
        build_lora_meta(6, [([1], [5, 6], [1.0], None)])
    with pytest.raises(ValueError, match="one value per row"):
        build_lora_meta(6, [([1, 2], [5], None, [1.0])])


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels not built (no C++ compiler)")
def test_kernel_path_builds_no_bmm_layout():
    """With the kernel taking the short segments, the padded bmm layout is never built (per-step work)."""
    x, y, a_pool, b_pool, segments = random_case(5, **CASES["decode-mixed-ranks"])
    meta = build_lora_meta(x.shape[0], segments)
    with torch.inference_mode():
        lora_apply_cpu(y.clone(), x, a_pool, b_pool, meta)
    assert cpu_layout(meta)._bmm is None
