"""paged_attention and build_forward_batch against a naive dense attention over the same tokens."""
import random

import pytest
import torch

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.attention import (
    allocate_kv_caches,
    attend,
    build_forward_batch,
    build_packed_batch,
    paged_attention,
    write_kv,
)


def naive_attention(q, k_seq, v_seq, position, scale, sliding_window=None):
    """q [heads, d] of the token at `position`; k_seq, v_seq [seq_len, kv_heads, d] -> [heads, d] (float64)."""
    group = q.shape[0] // k_seq.shape[1]
    lo = 0 if sliding_window is None else max(0, position - sliding_window + 1)
    k = k_seq[lo:position + 1].double().repeat_interleave(group, dim=1)  # [n, heads, d]
    v = v_seq[lo:position + 1].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.double(), k) * scale
    return torch.einsum("hn,nhd->hd", scores.softmax(-1), v)


def random_block_tables(kv_lens, block_size, num_blocks, rng):
    free = list(range(num_blocks))
    rng.shuffle(free)
    return [[free.pop() for _ in range(-(-n // block_size))] for n in kv_lens]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,sliding_window", [
    (4, 4, 16, 16, None),
    (6, 2, 24, 4, None),  # GQA, odd head size, tiny blocks
    (9, 3, 64, 8, None),  # the default model's geometry
    (4, 1, 8, 4, 5),  # MQA with a sliding window
])
@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["torch", "cpu-kernel"])
def test_paged_attention_matches_dense(num_heads, num_kv_heads, head_dim, block_size, sliding_window, cpu_kernel):
    if cpu_kernel and not cpu_kernels.available():
        pytest.skip("CPU kernels not built (no C++ compiler)")
    rng = random.Random(0)
    torch.manual_seed(0)
    # (num_computed_tokens, query_len): three decodes, then a whole prompt, a later chunk, a 1-token chunk
    requests = [(0, 1), (6, 1), (33, 1), (0, 7), (13, 19), (4, 1)]
    kv_lens = [c + q for c, q in requests]
    tables = random_block_tables(kv_lens, block_size, 64, rng)
    num_slots = 64 * block_size
    (cache,) = allocate_kv_caches(1, num_slots, num_kv_heads, head_dim, torch.float32)
    # full per-request K/V sequences; the past goes into the cache directly, the new part via write_kv
    seqs = [(torch.randn(n, num_kv_heads, head_dim), torch.randn(n, num_kv_heads, head_dim)) for n in kv_lens]
    input_ids = [0] * sum(q for _, q in requests)
    batch = build_forward_batch(input_ids, [q for _, q in requests], [c for c, _ in requests], tables,
                                block_size, logits_indices=[], sliding_window=sliding_window, cpu_kernel=cpu_kernel)
    assert batch.attn.num_decode_tokens == 3 and len(batch.attn.prefills) == (0 if cpu_kernel else 3)
    for (computed, _), table, (k, v) in zip(requests, tables, seqs):
        past = torch.tensor([table[j // block_size] * block_size + j % block_size for j in range(computed)],
                            dtype=torch.int64)
        write_kv(cache, k[:computed], v[:computed], past)
    new_k = torch.cat([k[c:] for (c, _), (k, _) in zip(requests, seqs)])
    new_v = torch.cat([v[c:] for (c, _), (_, v) in zip(requests, seqs)])
    write_kv(cache, new_k, new_v, batch.slot_mapping)

    q = torch.randn(len(input_ids), num_heads, head_dim)
    scale = head_dim ** -0.5
    out = paged_attention(q, cache, batch.attn, scale)
    assert out.shape == q.shape
    row = 0
    for (computed, q_len), (k, v) in zip(requests, seqs):
        for pos in range(computed, computed + q_len):
            assert batch.positions[row] == pos
            want = naive_attention(q[row], k, v, pos, scale, sliding_window)
            torch.testing.assert_close(out[row].double(), want, atol=1e-5, rtol=1e-5)
            row += 1


def test_paged_attention_bfloat16_close_to_float32():
    torch.manual_seed(1)
    batch = build_forward_batch([0] * 12, [1, 1, 10], [5, 9, 0], [[0, 1], [2, 3], [4, 5, 6]], 4)
    (cache,) = allocate_kv_caches(1, 32, 2, 32, torch.float32)
    cache.k.normal_(), cache.v.normal_()
    q = torch.randn(12, 4, 32)
    ref = paged_attention(q, cache, batch.attn, 0.2)
    (cache16,) = allocate_kv_caches(1, 32, 2, 32, torch.bfloat16)
    cache16.k.copy_(cache.k), cache16.v.copy_(cache.v)
    out = paged_attention(q.bfloat16(), cache16, batch.attn, 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_build_forward_batch_layout():
    batch = build_forward_batch([7, 8, 1, 2, 3], [1, 1, 3], [2, 0, 4], [[5], [1], [2, 9]], 4)
    assert batch.positions.tolist() == [2, 0, 4, 5, 6]
    assert batch.slot_mapping.tolist() == [22, 4, 36, 37, 38]  # block 5 slot 2, block 1 slot 0, block 9 ...
    assert batch.logits_indices.tolist() == [0, 1, 4]
    attn = batch.attn
    assert attn.num_decode_tokens == 2
    assert attn.decode_kv_lens.tolist() == [3, 1]
    assert attn.decode_mask[:, 0, 0].tolist() == [[True, True, True], [True, False, False]]
    assert attn.decode_kv_slots.tolist() == [[20, 21, 22], [4, 0, 0]]  # padding -> 0
    (chunk,) = attn.prefills
    assert (chunk.query_start, chunk.query_len) == (2, 3)
    assert chunk.kv_slots.tolist() == [8, 9, 10, 11, 36, 37, 38]
    assert chunk.mask.shape == (3, 7) and chunk.mask.sum(1).tolist() == [5, 6, 7]
    whole = build_forward_batch([1, 2, 3], [3], [0], [[0]], 4).attn.prefills[0]
    assert whole.mask is None  # a whole prompt uses is_causal


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_decode_steps_fast_batch_equals_the_general_one(sliding_window):
    """Decode-only steps on the CPU kernel path take a short path (attention._decode_batch): the same tensors as the
    general builder, field by field, for random batches (ragged block tables, given and default logits rows)."""
    from loraplex.engine.layers import attention
    rng = random.Random(0)
    for trial in range(40):
        n, block_size = rng.randint(1, 9), rng.choice([1, 4, 16])
        computed = [rng.randint(0, 60) for _ in range(n)]
        tables = [[rng.randint(0, 99) for _ in range(c // block_size + 1 + rng.randint(0, 2))] for c in computed]
        ids = [rng.randint(0, 500) for _ in range(n)]
        logits = None if trial % 2 else sorted(rng.sample(range(n), rng.randint(1, n)))
        fast = build_forward_batch(ids, [1] * n, computed, tables, block_size, logits_indices=logits,
                                   sliding_window=sliding_window, cpu_kernel=True)
        general = attention._general_batch(ids, [1] * n, computed, tables, block_size, "cpu", logits, sliding_window,
                                           True)
        for name in ("input_ids", "positions", "slot_mapping", "logits_indices"):
            assert torch.equal(getattr(fast, name), getattr(general, name)), name
        for name in ("kernel_slots", "kernel_rows", "kernel_lens"):
            assert torch.equal(getattr(fast.attn, name), getattr(general.attn, name)), name
        for name in ("num_decode_tokens", "prefills", "sliding_window", "packed", "decode_kv_slots", "decode_mask",
                     "decode_kv_lens"):  # every other field too
            assert getattr(fast.attn, name) == getattr(general.attn, name), name
    with pytest.raises(ValueError):
        build_forward_batch([1], [1], [8], [[0]], 4, cpu_kernel=True)


def test_build_forward_batch_rejects_short_block_table():
    with pytest.raises(ValueError):
        build_forward_batch([1, 2, 3], [3], [2], [[0]], 4)


@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["torch", "cpu-kernel"])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_packed_batch_attends_within_each_sequence(cpu_kernel, sliding_window):
    """Training layout: positions restart at 0 in every sequence, each row sees only its own sequence's earlier
    rows (dense float64 reference), and no KV cache is involved."""
    if cpu_kernel and not cpu_kernels.available():
        pytest.skip("CPU kernels not built (no C++ compiler)")
    torch.manual_seed(0)
    lens = [5, 1, 9]
    batch = build_packed_batch(list(range(15)), lens, "cpu", sliding_window, cpu_kernel=cpu_kernel)
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert batch.attn.packed.cu_seqlens.tolist() == [0, 5, 6, 15] and batch.logits_indices.tolist() == [4, 5, 14]
    assert (batch.attn.packed.kernel_slots is not None) == cpu_kernel
    q, k, v = torch.randn(15, 4, 16), torch.randn(15, 2, 16), torch.randn(15, 2, 16)
    out = attend(q, k, v, None, batch.slot_mapping, batch.attn, 0.25)
    for start, n in ((0, 5), (5, 1), (6, 9)):
        for i in range(n):
            want = naive_attention(q[start + i], k[start:start + n], v[start:start + n], i, 0.25, sliding_window)
            torch.testing.assert_close(out[start + i].double(), want, atol=1e-5, rtol=1e-5)


def test_packed_batch_rejects_bad_lengths():
    with pytest.raises(ValueError, match="add up"):
        build_packed_batch([1, 2, 3], [2, 2])
    with pytest.raises(ValueError, match="positive"):
        build_packed_batch([1, 2], [2, 0])
