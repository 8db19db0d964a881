"""The fused CPU attention kernel (engine/kernels/csrc/cpu_attention.cpp) against its plain-torch references."""
import random
import shutil

import pytest
import torch

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.attention import (
    KERNEL_MAX_PREFILL_TOKENS,
    allocate_kv_caches,
    build_forward_batch,
    build_packed_batch,
    packed_attention,
    paged_attention,
    write_kv,
)

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels not built (no C++ compiler)")


def test_kernel_builds_where_a_compiler_exists():
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine: the plain-torch path is used")
    assert cpu_kernels.available(), cpu_kernels.build_error()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_CPU_KERNELS", "0")
    assert not cpu_kernels.enabled() and not cpu_kernels.available()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window", [
    (9, 3, 64, None),  # the default model (vectorised head_dim 64 path)
    (8, 2, 128, None),  # vectorised head_dim 128
    (6, 2, 24, None),  # generic path
    (4, 1, 64, 5),  # MQA with a sliding window
    (10, 2, 64, None),  # groups of 5 query heads: the vectorised path one head at a time
])
def test_kernel_matches_reference(dtype, num_heads, num_kv_heads, head_dim, window):
    gen = torch.Generator().manual_seed(0)
    num_slots, rows = 800, 5
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    table = torch.stack([torch.randperm(num_slots, generator=gen)[:400] for _ in range(rows)])  # [rows, 400]
    row_index = torch.tensor([0, 1, 2, 2, 2, 3, 4, 4, 0, 1, 3, 2])
    # 0: left to another path, gets zeros; under 64 keys: one chunk of the vectorised path; 64-256 keys: two halves,
    # merged; more: chunks of 256, merged
    row_len = torch.tensor([1, 17, 3, 4, 5, 40, 63, 0, 64, 128, 129, 400])
    q = torch.randn(len(row_index), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    out = cpu_kernels.paged_attention(q, k_cache, v_cache, table, row_index, row_len, window, scale)
    ref = cpu_kernels.paged_attention_reference(q, k_cache, v_cache, table, row_index, row_len, window, scale)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: one rounding of the output
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert not out[7].any()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_rows_output_is_its_own(dtype):
    """Rows of 64 keys or more are split into parts that different threads compute and then merged: each row's
    output is bit for bit the same alone, beside other rows and on one thread or two."""
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(1200, 3, 64, generator=gen).to(dtype) for _ in range(2))
    table = torch.stack([torch.randperm(1200, generator=gen)[:1000] for _ in range(3)])
    row_index, row_len = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1000, 300, 7, 257, 64, 101])
    q = torch.randn(len(row_len), 9, 64, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        together = cpu_kernels.paged_attention(q, k_cache, v_cache, table, row_index, row_len, None, 0.125)
        for n in (1, 2):
            torch.set_num_threads(n)
            for i in range(len(row_len)):
                alone = cpu_kernels.paged_attention(q[i:i + 1], k_cache, v_cache, table, row_index[i:i + 1],
                                                    row_len[i:i + 1], None, 0.125)
                assert torch.equal(alone[0], together[i]), (n, i)
    finally:
        torch.set_num_threads(threads)


def _packed_attention_and_grads(q, k, v, lens, window, grad):
    """out, dq, dk, dv of packed_attention over sequences of `lens` (whichever path is active)."""
    batch = build_packed_batch(list(range(sum(lens))), lens, "cpu", window, cpu_kernel=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = packed_attention(q, k, v, batch.attn.packed, window, q.shape[-1] ** -0.5)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window", [
    (9, 3, 64, None),  # the default model (blocked AVX-512 backward)
    (8, 2, 128, None),  # head_dim 128
    (6, 2, 24, None),  # generic path
    (4, 1, 64, 5),  # MQA with a sliding window
])
def test_packed_attention_kernel_matches_reference(dtype, num_heads, num_kv_heads, head_dim, window):
    """Training attention: the kernel forward and backward give the outputs and gradients of autograd through
    SDPA per sequence (float32 reference from the same inputs), for lengths around the 16-row blocks."""
    gen = torch.Generator().manual_seed(0)
    lens = [1, 17, 40, 16, 33, 2]
    n = sum(lens)
    q = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
    grad = torch.randn(n, num_heads, head_dim, generator=gen).to(dtype)
    got = _packed_attention_and_grads(q, k, v, lens, window, grad)
    with cpu_kernels.suspended():
        want = _packed_attention_and_grads(q.float(), k.float(), v.float(), lens, window, grad.float())
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        err = float((g.float() - w).abs().max() / w.abs().max())
        assert err < (2e-6 if dtype == torch.float32 else 2e-2), (name, err)


@needs_kernel
def test_packed_attention_backward_rejects_bad_inputs():
    q, kv = torch.randn(5, 4, 8), torch.randn(5, 2, 8)
    with pytest.raises(RuntimeError, match="from 0 to N"):
        cpu_kernels.packed_attention_backward(q, kv, kv, q, torch.tensor([0, 2, 4]), None, 1.0)
    with pytest.raises(RuntimeError, match="must not decrease"):
        cpu_kernels.packed_attention_backward(q, kv, kv, q, torch.tensor([0, 3, 2, 5]), None, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_kernels.packed_attention_backward(q, kv.double(), kv, q, torch.tensor([0, 5]), None, 1.0)


@needs_kernel
def test_kernel_rejects_bad_inputs():
    q, cache = torch.randn(2, 4, 8), torch.randn(10, 2, 8)
    table, rows = torch.zeros(1, 4, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_kernels.paged_attention(q.double(), cache, cache, table, rows, rows, None, 1.0)
    with pytest.raises(RuntimeError, match="exceeds the slot table"):
        cpu_kernels.paged_attention(q, cache, cache, table, rows, torch.tensor([1, 5]), None, 1.0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_through_kernel_equals_torch_path(dtype):
    """A whole step (decodes, short prefill chunks, one chunk long enough to stay on SDPA) gives the same
    attention output with the kernel metadata as with the plain-torch metadata."""
    rng = random.Random(0)
    torch.manual_seed(0)
    requests = [(5, 1), (40, 1), (0, 1), (0, 12), (30, 9), (3, KERNEL_MAX_PREFILL_TOKENS + 20)]
    kv_lens = [c + q for c, q in requests]
    block_size = 8
    num_blocks = sum(-(-n // block_size) for n in kv_lens)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in kv_lens]
    (cache,) = allocate_kv_caches(1, num_blocks * block_size, 3, 64, dtype)
    cache.k.normal_(), cache.v.normal_()
    args = ([0] * sum(q for _, q in requests), [q for _, q in requests], [c for c, _ in requests], tables,
            block_size)
    torch_batch = build_forward_batch(*args, logits_indices=[])
    kernel_batch = build_forward_batch(*args, logits_indices=[], cpu_kernel=True)
    assert kernel_batch.attn.decode_kv_slots is None and len(kernel_batch.attn.prefills) == 1  # the long chunk
    write_kv(cache, torch.randn(len(args[0]), 3, 64), torch.randn(len(args[0]), 3, 64), torch_batch.slot_mapping)
    q = torch.randn(len(args[0]), 9, 64).to(dtype)
    want = paged_attention(q, cache, torch_batch.attn, 0.125)
    got = paged_attention(q, cache, kernel_batch.attn, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def _assert_matches(got, want, dtype):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # same rounding points as the reference: at most one bfloat16 ulp apart, mostly identical
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2 ** -7)
        assert (got == want).float().mean() > 0.95


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [576, 40])  # the default model's hidden size; a masked tail
def test_elementwise_kernels_match_references(dtype, dim):
    from loraplex.engine.layers import elementwise
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, dim, generator=gen) * 3).to(dtype)
    w = (torch.rand(dim, generator=gen) + 0.5).to(dtype)
    with torch.inference_mode():
        _assert_matches(torch.ops.loraplex_cpu.rms_norm(x, w, 1e-5), elementwise.rms_norm_reference(x, w, 1e-5), dtype)
        a = (torch.randn(37, dim, generator=gen) * 3).to(dtype)
        total, normed = torch.ops.loraplex_cpu.add_rms_norm(x, a, w, 1e-5)
        assert torch.equal(total, x + a)  # the add rounds exactly as torch's
        _assert_matches(normed, elementwise.rms_norm_reference(x + a, w, 1e-5), dtype)
        gate_up = (torch.randn(37, 2 * dim, generator=gen) * 4).to(dtype)
        gate, up = gate_up[:, :dim], gate_up[:, dim:]  # strided rows, as from a fused projection
        _assert_matches(torch.ops.loraplex_cpu.silu_and_mul(gate, up), elementwise.silu_and_mul_reference(gate, up), dtype)


@needs_kernel
def test_silu_and_mul_at_the_ends_of_exps_range():
    """The vectorised exp's clamps (AVX2: 2^n built in the exponent bits) keep silu finite and right far out: 0 for
    large negative gates (exp overflowing), the gate itself for large positive ones (exp underflowing)."""
    from loraplex.engine.layers import elementwise
    ends = torch.tensor([-1e4, -200., -104., -90., -88., -87.5, -20., -1e-3, 0., 1e-3, 20., 87.5, 88., 90., 104., 200.,
                         1e4])
    gate = ends.repeat(3)[:48].reshape(1, 48)  # 8-lane vectors and a tail
    up = torch.ones_like(gate)
    with torch.inference_mode():
        got = torch.ops.loraplex_cpu.silu_and_mul(gate, up)
    want = elementwise.silu_and_mul_reference(gate, up)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [(9, 64), (2, 24)])  # vectorised halves; generic path
def test_rotary_kernel_matches_reference(dtype, heads, head_dim):
    from loraplex.engine.layers import elementwise
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, heads, head_dim, generator=gen).to(dtype)
    angle = torch.rand(11, 1, head_dim // 2, generator=gen) * 100
    cos, sin = torch.cat([angle, angle], -1).cos().to(dtype), torch.cat([angle, angle], -1).sin().to(dtype)
    want = elementwise.apply_rotary_reference(x, cos, sin)
    got = x.clone()
    assert torch.ops.loraplex_cpu.rotary_(got, cos, sin) is got  # in place
    _assert_matches(got, want, dtype)


@needs_kernel
def test_layers_use_references_under_autograd():
    """Training backpropagates through these: with grad enabled the kernels (no autograd) stay out."""
    from loraplex.engine.layers import elementwise
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(32, dtype=torch.bfloat16)
    elementwise.rms_norm(x, w, 1e-6).sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(elementwise.rms_norm(x.detach(), w, 1e-6), elementwise.rms_norm_reference(x.detach(), w, 1e-6))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_kernel_matches_torch(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 49152 + 5, generator=gen).to(dtype)  # a vocabulary with a tail past 16 lanes
    x[1, 7] = x[1, 40000] = x[1].max() + 1  # ties go to the first index
    x[2, :] = 0.5
    x[3, 100] = float("nan")  # a NaN wins, as in torch.max
    x[4, -1] = 100.0  # the maximum in the tail
    short = torch.randn(3, 7, generator=gen).to(dtype)  # shorter than one vector
    for t in (x, short):
        want = torch.stack([row.argmax() if not row.isnan().any() else row.isnan().nonzero()[0, 0] for row in t])
        assert torch.ops.loraplex_cpu.argmax_rows(t).tolist() == want.tolist()


@needs_kernel
def test_attend_writes_the_cache_and_matches_torch_path():
    """attend(): the kernel path writes this step's keys/values itself (no separate index_copy_)."""
    from loraplex.engine.layers.attention import attend
    torch.manual_seed(3)
    requests = [(7, 1), (20, 1), (0, 5), (9, 4)]  # decodes and short prefill chunks only
    tables = [[3, 8], [1, 5], [0], [2, 6]]
    args = ([0] * sum(q for _, q in requests), [q for _, q in requests], [c for c, _ in requests], tables, 16)
    caches = allocate_kv_caches(2, 10 * 16, 3, 64, torch.bfloat16)
    for c in caches:
        c.k.normal_(), c.v.normal_()
    torch_cache, kernel_cache = caches
    kernel_cache.k.copy_(torch_cache.k), kernel_cache.v.copy_(torch_cache.v)
    n = len(args[0])
    q, k, v = (torch.randn(n, heads, 64).bfloat16() for heads in (9, 3, 3))
    torch_batch = build_forward_batch(*args, logits_indices=[])
    kernel_batch = build_forward_batch(*args, logits_indices=[], cpu_kernel=True)
    want = attend(q, k, v, torch_cache, torch_batch.slot_mapping, torch_batch.attn, 0.125)
    got = attend(q, k, v, kernel_cache, kernel_batch.slot_mapping, kernel_batch.attn, 0.125)
    assert torch.equal(kernel_cache.k, torch_cache.k) and torch.equal(kernel_cache.v, torch_cache.v)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    bad = kernel_batch.slot_mapping.clone()
    bad[0] = 10 * 16  # one past the end: refused before anything is written
    before = kernel_cache.k.clone()
    with pytest.raises(RuntimeError, match="out of range"):
        attend(q, k, v, kernel_cache, bad, kernel_batch.attn, 0.125)
    assert torch.equal(kernel_cache.k, before)


def test_a_failed_build_leaves_the_torch_path(monkeypatch, caplog):
    """No compiler (or a compile error): available() says so once, logs why, and callers stay on torch."""
    from loraplex.engine.layers import elementwise
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_build_and_load", lambda: (_ for _ in ()).throw(OSError("no c++ here")))
    with caplog.at_level("WARNING"):
        assert not cpu_kernels.available() and not cpu_kernels.loaded()
    assert "no c++ here" in cpu_kernels.build_error() and "plain-torch" in caplog.text
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(elementwise.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6),
                           elementwise.rms_norm_reference(x, torch.ones(8, dtype=torch.bfloat16), 1e-6))


@pytest.mark.slow
@needs_kernel
def test_generic_code_paths_on_an_avx2_build(tmp_path):
    """The kernels built for an AVX2-only x86-64 (no AVX-512: AVX2 loops where there are some, else the plain ones)
    pass the same tests (the screened greedy head's kernel-level ones too), and the integer dot products of the
    int8-activation linears and the bfloat16 x bfloat16 products give the same bits as this CPU's build."""
    if torch.ops.loraplex_cpu.vector_isa() != "avx512":
        pytest.skip("this CPU's own build is the AVX2 or generic one: the whole suite already runs it")
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, LORAPLEX_CPU_KERNELS_ARCH="x86-64-v3", LORAPLEX_CACHE_DIR=str(tmp_path))
    check = subprocess.run([sys.executable, "-c", "import torch; from loraplex.engine.kernels import cpu_kernels as ck; "
                            "assert ck.available(), ck.build_error(); print(torch.ops.loraplex_cpu.vector_isa())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and check.stdout.strip() == "avx2", check.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                          "tests/engine/kernels/test_cpu_kernels.py", "tests/adapters/test_ops.py",
                          "tests/engine/quant/test_stream.py",
                          *(f"tests/engine/layers/test_greedy_head.py::{name}" for name in (
                              "test_screened_tokens_equal_the_plain_argmax",
                              "test_ties_go_to_the_lowest_index_as_the_plain_argmax",
                              "test_bound_holds_and_candidates_hold_every_maximum",
                              "test_gathered_rows_compute_bit_for_bit_as_in_the_full_head"))],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]
    from tests.engine.quant.test_stream import kernel_digest
    digest = subprocess.run([sys.executable, "-c", "from tests.engine.quant.test_stream import kernel_digest; "
                             "print(kernel_digest())"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert digest.returncode == 0, digest.stderr[-2000:]
    assert digest.stdout.strip() == kernel_digest()


@needs_kernel
def test_the_same_sources_elsewhere_load_the_cached_build(tmp_path):
    """Another checkout or install (the same sources at another path: a fresh clone, a venv's site-packages) loads the
    library built here as it is; torch's own check compares source paths and would rebuild it, and two checkouts would
    rebuild it in turn at every start."""
    import subprocess
    import sys
    from pathlib import Path
    key = cpu_kernels.build_key()
    library = cpu_kernels.cache_dir() / "kernels" / key / f"loraplex_cpu_{key}.so"
    assert library.exists()
    before = library.stat().st_mtime_ns
    copy = tmp_path / "elsewhere" / "csrc"
    shutil.copytree(Path(cpu_kernels.__file__).parent / "csrc", copy)
    code = ("from pathlib import Path; import torch; from loraplex.engine.kernels import cpu_kernels as ck; "
            f"here = Path({str(copy)!r}); "
            "ck.SOURCES = [here / s.name for s in ck.SOURCES]; ck.HEADERS = [here / h.name for h in ck.HEADERS]; "
            "assert ck.available(), ck.build_error(); print(ck.build_key(), torch.ops.loraplex_cpu.vector_isa())")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == key and "building" not in done.stderr
    assert library.stat().st_mtime_ns == before  # loaded, not rebuilt


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A process killed while building leaves torch's `lock` file; torch would wait on it for ever at every start."""
    import os
    import time

    from loraplex.engine.kernels.cpu_kernels import STALE_LOCK_S, _drop_stale_lock
    lock = tmp_path / "lock"
    lock.write_text("")
    _drop_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running right now
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    _drop_stale_lock(tmp_path)
    assert not lock.exists()
    _drop_stale_lock(tmp_path)  # nothing there: nothing happens


def test_a_damaged_cached_build_is_rebuilt_not_loaded_again(tmp_path, monkeypatch):
    """A cached library that does not load (a build killed mid-link) is removed and built again: torch, finding its
    build files up to date, would otherwise load the same broken file."""
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpu_kernels, "cache_dir", lambda: tmp_path)
    key = cpu_kernels.build_key()
    build_dir = tmp_path / "kernels" / key
    build_dir.mkdir(parents=True)
    library = build_dir / f"loraplex_cpu_{key}.so"
    library.write_bytes(b"not a shared library")
    seen = {}

    def fake_load(**kwargs):  # the compiler run itself is test_generic_code_paths_on_an_avx2_build's
        seen["library_left"] = library.exists()
        seen["build_directory"] = kwargs["build_directory"]
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.ops.loraplex_cpu, "vector_isa", lambda: "test", raising=False)
    cpu_kernels._build_and_load()
    assert seen == {"library_left": False, "build_directory": str(build_dir)}
