"""The Triton LoRA kernels (adapters/ops/triton_ops.py) against the plain-torch reference.

Without a GPU the kernels run under the Triton interpreter, in a child process started with
TRITON_INTERPRET=1 (this file run as a script; it prints one JSON line of case -> traceback or null).
Why a child process and not os.environ in this module: triton reads TRITON_INTERPRET when @triton.jit
decorates a kernel, i.e. when triton_ops is first imported, which another test module may already
have done (setting the variable afterwards changes nothing); and one process holds either interpreted
or compiled kernels, while the `cuda` test below must run the compiled ones. The child costs one
interpreter start-up (a few seconds) for all cases.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

from loraplex.adapters.ops import triton_ops
from loraplex.adapters.ops.meta import ZERO_PAGE, build_lora_meta
from loraplex.adapters.ops.reference import lora_apply_ref, lora_expand_ref, lora_shrink_ref

# max |actual - expected| allowed, relative to max(1, max |expected|). h is fp32 whatever the input
# dtype (16-bit products are exact in fp32, so only the summation order differs); y is rounded to its
# dtype (the reference rounds the delta and then the sum, the kernel only the sum: ~1 ulp apart).
H_TOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
Y_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CUDA_SLACK = 4  # tensor-core tiles sum in another order; a 16-bit y's expand runs in tf32
# Older interpreters (triton 3.6) call int() on 1-element arrays for loop bounds, which numpy >= 2.4
# refuses: every case then fails with this, and the interpreted tests are skipped as unrunnable here.
OLD_INTERPRETER_ERROR = "only 0-dimensional arrays can be converted to Python scalars"


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    bound = tol * max(1.0, expected.float().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _check(device: str, *, in_features: int, out_features: int, num_tokens: int,
           segments: list[tuple[int, int]], dtype: torch.dtype, seed: int,
           contiguous_rows: bool = False, strided: bool = False, slack: float = 1.0, scaled: bool = False) -> None:
    """`segments`: (number of rows, rank) per adapter. Rows are scattered over the batch (or consecutive
    ranges with `contiguous_rows`), the rest of the batch are base rows; pages are scattered over a pool
    whose page 0 is zero; `strided` makes x, y and the pools column slices of wider tensors; `scaled` gives
    segments page weights and rows scales (several adapters in one request, per-request lora_scale)."""
    gen = torch.Generator().manual_seed(seed)
    num_pages = 1 + sum(rank for _, rank in segments) + 7
    num_rows = sum(n for n, _ in segments)
    assert num_rows <= num_tokens
    rows = (torch.arange(num_tokens) if contiguous_rows else torch.randperm(num_tokens, generator=gen))
    rows = rows[:num_rows].tolist()
    pages = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    spec, row_at, page_at = [], 0, 0
    for n, rank in segments:
        spec.append((rows[row_at:row_at + n], pages[page_at:page_at + rank]))
        if scaled:
            spec[-1] += ((torch.rand(rank, generator=gen) * 2 - 0.5).tolist(),
                         (torch.rand(n, generator=gen) * 2).tolist() if len(spec) % 2 else None)
        row_at, page_at = row_at + n, page_at + rank
    meta = build_lora_meta(num_tokens, spec, device=device)
    meta_ref = build_lora_meta(num_tokens, spec)

    def on_device(t: torch.Tensor) -> torch.Tensor:
        """A copy of t on `device`; with `strided`, a column slice of a wider tensor (row stride != width)."""
        if not strided:
            return t.to(device, copy=True)
        wide = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype, device=device)
        wide[:, 2:2 + t.shape[1]] = t.to(device)
        return wide[:, 2:2 + t.shape[1]]

    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
    a_pool = torch.randn(num_pages, in_features, generator=gen).to(dtype)
    b_pool = (torch.randn(num_pages, out_features, generator=gen) * 0.5).to(dtype)
    a_pool[ZERO_PAGE] = 0
    b_pool[ZERO_PAGE] = 0
    y0 = torch.randn(num_tokens, out_features, generator=gen).to(dtype)
    x_dev, a_dev, b_dev = on_device(x), on_device(a_pool), on_device(b_pool)

    h_ref = lora_shrink_ref(x, a_pool, meta_ref)
    h = triton_ops.lora_shrink_triton(x_dev, a_dev, meta)
    assert h.dtype == torch.float32 and h.shape == h_ref.shape
    _assert_close(h.cpu(), h_ref, H_TOL[dtype] * slack, "shrink")

    y_ref = y0.clone()
    lora_expand_ref(y_ref, h_ref, b_pool, meta_ref)
    y = on_device(y0)
    triton_ops.lora_expand_triton(y, h_ref.to(device), b_dev, meta)
    _assert_close(y.cpu(), y_ref, Y_TOL[dtype] * slack, "expand")

    y_ref = y0.clone()
    lora_apply_ref(y_ref, x, a_pool, b_pool, meta_ref)
    y = on_device(y0)
    triton_ops.lora_apply_triton(y, x_dev, a_dev, b_dev, meta)
    _assert_close(y.cpu(), y_ref, Y_TOL[dtype] * slack, "apply")
    base_rows = sorted(set(range(num_tokens)) - set(rows))
    assert torch.equal(y.cpu()[base_rows], y0[base_rows]), "base rows must be left as they were"


MIXED_RANKS = [(3, 1), (1, 4), (5, 8), (2, 16), (7, 64)]
CASES = {
    "mixed_ranks_fp32": dict(in_features=100, out_features=37, num_tokens=24, segments=MIXED_RANKS,
                             dtype=torch.float32, seed=0),
    "mixed_ranks_bf16": dict(in_features=100, out_features=37, num_tokens=24, segments=MIXED_RANKS,
                             dtype=torch.bfloat16, seed=1),
    "mixed_ranks_fp16": dict(in_features=37, out_features=100, num_tokens=24, segments=MIXED_RANKS,
                             dtype=torch.float16, seed=2),
    "model_sizes_bf16": dict(in_features=576, out_features=1536, num_tokens=9, segments=[(4, 8), (2, 16)],
                             dtype=torch.bfloat16, seed=3),
    "model_sizes_fp32": dict(in_features=1536, out_features=192, num_tokens=9, segments=[(3, 16), (5, 4)],
                             dtype=torch.float32, seed=4),
    "long_and_short_segments_bf16": dict(in_features=40, out_features=24, num_tokens=160,
                                         segments=[(130, 8), (1, 4), (1, 16), (17, 2), (1, 1)],
                                         dtype=torch.bfloat16, seed=5),
    "prefill_ranges_fp32": dict(in_features=48, out_features=20, num_tokens=100, segments=[(70, 4), (20, 8)],
                                dtype=torch.float32, seed=6, contiguous_rows=True),
    "rank_one_tiny_features_fp32": dict(in_features=5, out_features=3, num_tokens=6, segments=[(2, 1), (3, 1)],
                                        dtype=torch.float32, seed=7),
    "scaled_mixed_ranks_fp32": dict(in_features=100, out_features=37, num_tokens=24, segments=MIXED_RANKS,
                                    dtype=torch.float32, seed=9, scaled=True),
    "scaled_prefill_bf16": dict(in_features=48, out_features=20, num_tokens=100, segments=[(70, 4), (20, 8)],
                                dtype=torch.bfloat16, seed=10, contiguous_rows=True, scaled=True),
    "strided_fp16": dict(in_features=33, out_features=65, num_tokens=12, segments=[(4, 8), (3, 32)],
                         dtype=torch.float16, seed=8, strided=True),
}


def _run_cases_interpreted() -> dict[str, str | None]:
    assert triton_ops._INTERPRETED, "run with TRITON_INTERPRET=1"
    results = {}
    for name, kwargs in CASES.items():
        try:
            _check("cpu", **kwargs)
            results[name] = None
        except Exception:  # reported back per case, so one failure doesn't hide the others
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str | None]:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if all(error is not None and OLD_INTERPRETER_ERROR in error for error in results.values()):
        pytest.skip("this triton's interpreter does not work with this numpy (int() of a 1-element array)")
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_interpreted(case, interpreted_results):
    assert interpreted_results[case] is None, interpreted_results[case]


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_on_cuda(case):
    pytest.importorskip("triton")
    if triton_ops._INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: this test is for the compiled kernels")
    _check("cuda", **CASES[case], slack=CUDA_SLACK)


def test_imports_without_triton_and_refuses_to_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_triton_ops_without_triton", triton_ops.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.HAS_TRITON
    meta = build_lora_meta(2, [([1], [1])])
    with pytest.raises(RuntimeError, match="triton"):
        module.lora_apply_triton(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3), meta)


if __name__ == "__main__":
    print(json.dumps(_run_cases_interpreted()))
