"""Plain-torch paged attention (the CPU reference every fast path is checked against) and the
per-step builder of ForwardBatch / AttentionMetadata from plain Python lists."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.forward_batch import AttentionMetadata, ForwardBatch, KVCache, PackedSequences, PrefillChunk


def write_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values: k, v [num_tokens, num_kv_heads, head_dim] at flat slots."""
    cache.k.index_copy_(0, slot_mapping, k.to(cache.k.dtype))
    cache.v.index_copy_(0, slot_mapping, v.to(cache.v.dtype))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, slot_mapping: torch.Tensor,
           attn: AttentionMetadata, scale: float) -> torch.Tensor:
    """write_kv then paged_attention: q [num_tokens, heads, head_dim], this step's k, v [num_tokens,
    kv_heads, head_dim] -> [num_tokens, heads, head_dim]. The CPU kernel path does both in one call.
    Packed training sequences (attn.packed) attend to their own k, v only: no cache."""
    if attn.packed is not None:
        return packed_attention(q, k, v, attn.packed, attn.sliding_window, scale)
    if attn.kernel_lens is not None and not attn.prefills:
        return _kernel_attention(q, cache, attn, scale, k, v, slot_mapping)
    write_kv(cache, k, v, slot_mapping)
    return paged_attention(q, cache, attn, scale)


def _kernel_attention(q: torch.Tensor, cache: KVCache, attn: AttentionMetadata, scale: float,
                      k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                      slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU kernel over the kernel_* metadata; with k, v and slot_mapping it writes them first."""
    dtype = cache.k.dtype
    k, v = (None, None) if k is None else (k.to(dtype), v.to(dtype))
    return cpu_kernels.paged_attention(q.to(dtype), cache.k, cache.v, attn.kernel_slots, attn.kernel_rows,
                                       attn.kernel_lens, attn.sliding_window, scale, k, v, slot_mapping).to(q.dtype)


def paged_attention(q: torch.Tensor, cache: KVCache, attn: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [num_tokens, num_heads, head_dim] (decodes first, then prefill chunks) -> same shape.

    The step's own k/v must already be in the cache (write_kv before this call).
    """
    gqa = q.shape[1] != cache.k.shape[1]
    if attn.kernel_lens is not None:  # fused CPU kernel for every row but the long prefill chunks
        out = _kernel_attention(q, cache, attn, scale)
    else:
        out = torch.empty_like(q)
        nd = attn.num_decode_tokens
        if nd:
            out[:nd] = _decode_attention(q[:nd], cache, attn, scale)
    for chunk in attn.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        qc = q[rows].transpose(0, 1).unsqueeze(0).to(cache.k.dtype)  # [1, num_heads, query_len, head_dim]
        k = cache.k.index_select(0, chunk.kv_slots).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, kv_len, head_dim]
        v = cache.v.index_select(0, chunk.kv_slots).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qc, k, v, attn_mask=chunk.mask, is_causal=chunk.mask is None,
                                           scale=scale, enable_gqa=gqa)
        out[rows] = o[0].transpose(0, 1).to(q.dtype)  # [query_len, num_heads, head_dim]
    return out


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequences,
                     window: int | None, scale: float) -> torch.Tensor:
    """Causal self-attention of whole sequences packed in rows (training; differentiable): q [N, H, D],
    k, v [N, KVH, D] -> [N, H, D]. On CPU with the kernels: the paged kernel forward over k/v in place and
    the kernel backward (`_PackedAttentionKernel`); else the reference, SDPA per sequence."""
    if packed.kernel_slots is not None and cpu_kernels.loaded() and q.dtype == k.dtype == v.dtype:
        return _PackedAttentionKernel.apply(q, k, v, packed, window, scale)
    return packed_attention_reference(q, k, v, packed, window, scale)


def packed_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequences,
                               window: int | None, scale: float) -> torch.Tensor:
    out = []
    gqa = q.shape[1] != k.shape[1]
    starts = packed.cu_seqlens.tolist()
    for start, end in zip(starts[:-1], starts[1:]):
        n = end - start
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, head_dim]
        mask = None
        if window is not None and window < n:
            pos = torch.arange(n, device=q.device)
            mask = (pos.unsqueeze(0) <= pos.unsqueeze(1)) & (pos.unsqueeze(0) > pos.unsqueeze(1) - window)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=gqa)
        out.append(o[0].transpose(0, 1))  # [n, heads, head_dim]
    return torch.cat(out)


class _PackedAttentionKernel(torch.autograd.Function):
    """Forward: the paged kernel with k/v as the cache (no softmax saved); backward: the CPU kernel that
    recomputes each row's softmax (engine/kernels/csrc/cpu_attention_backward.cpp)."""

    @staticmethod
    def forward(ctx, q, k, v, packed: PackedSequences, window: int | None, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = cpu_kernels.paged_attention(q, k, v, packed.kernel_slots, packed.kernel_rows, packed.kernel_lens,
                                          window, scale)
        ctx.save_for_backward(q, k, v)
        ctx.packed, ctx.window, ctx.scale = packed, window, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = cpu_kernels.packed_attention_backward(q, k, v, grad.to(q.dtype), ctx.packed.cu_seqlens,
                                                           ctx.window, ctx.scale)
        return dq, dk, dv, None, None, None


def build_packed_batch(input_ids: Sequence[int], seq_lens: Sequence[int], device: torch.device | str = "cpu",
                       sliding_window: int | None = None, cpu_kernel: bool = False) -> ForwardBatch:
    """A ForwardBatch of whole sequences packed one after another (training): positions from 0 in each,
    attention within each sequence only (attn.packed), no KV cache. cpu_kernel: fill the kernel fields."""
    if not seq_lens or any(n < 1 for n in seq_lens) or sum(seq_lens) != len(input_ids):
        raise ValueError("seq_lens must be positive and add up to the number of input ids")
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    starts = torch.cumsum(lens, 0) - lens
    req = torch.repeat_interleave(torch.arange(len(seq_lens)), lens)
    positions = torch.arange(len(input_ids)) - starts[req]
    packed = PackedSequences(cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)]))
    if cpu_kernel:
        cols = torch.arange(int(lens.max()))
        packed.kernel_slots = torch.where(cols < lens.unsqueeze(1), starts.unsqueeze(1) + cols, 0).to(device)
        packed.kernel_rows = req.to(device)
        packed.kernel_lens = (positions + 1).to(device)
    rows = torch.arange(len(input_ids))
    return ForwardBatch(input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device), positions=positions.to(device),
                        slot_mapping=rows.to(device), attn=AttentionMetadata(sliding_window=sliding_window, packed=packed),
                        logits_indices=(starts + lens - 1).to(device))


def _decode_attention(q: torch.Tensor, cache: KVCache, attn: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per sequence: q [nd, num_heads, head_dim] -> [nd, num_heads, head_dim].

    K/V rows are gathered straight into [nd, kv_heads, max_kv_len, head_dim] (one index_select per
    tensor, no transpose copy), then two batched matmuls with an fp32 softmax, as transformers' eager
    attention does. On CPU this is several times faster than scaled_dot_product_attention, whose
    flash kernel is tuned for long queries rather than one row per sequence.
    """
    nd, max_kv_len = attn.decode_kv_slots.shape
    num_kv_heads, head_dim = cache.k.shape[1:]
    group = q.shape[1] // num_kv_heads  # query heads per kv head (GQA): head h reads kv head h // group
    if attn.decode_kv_rows is None:  # once per step, shared by every layer
        heads = torch.arange(num_kv_heads, device=q.device).view(1, -1, 1)
        attn.decode_kv_rows = (attn.decode_kv_slots.unsqueeze(1) * num_kv_heads + heads).reshape(-1)
        attn.decode_bias = torch.zeros(attn.decode_mask.shape, dtype=torch.float32, device=q.device) \
            .masked_fill_(~attn.decode_mask, float("-inf"))
    shape = (nd, num_kv_heads, max_kv_len, head_dim)
    k = cache.k.view(-1, head_dim).index_select(0, attn.decode_kv_rows).view(shape)
    v = cache.v.view(-1, head_dim).index_select(0, attn.decode_kv_rows).view(shape)
    qg = q.view(nd, num_kv_heads, group, head_dim).to(k.dtype)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float()  # [nd, kv_heads, group, max_kv_len]
    probs = scores.mul_(scale).add_(attn.decode_bias).softmax(-1).to(v.dtype)
    return torch.matmul(probs, v).view(nd, num_kv_heads * group, head_dim).to(q.dtype)


# Prefill chunks up to this many query tokens go through the CPU kernel; longer ones keep SDPA, whose
# blocked kernel catches up as query_len x kv_len grows (`python scripts/bench/bench_attention.py`, bf16,
# whole prompts: kernel/SDPA time 0.18 at 16 tokens, 0.53 at 256, 0.79 at 1024, 0.93 at 2048).
KERNEL_MAX_PREFILL_TOKENS = 1024


def _slots(block_table: torch.Tensor, cols: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat KV slot of token index `cols` given block table rows (broadcasting)."""
    return block_table.gather(-1, cols // block_size) * block_size + cols % block_size


def build_forward_batch(
    input_ids: Sequence[int],
    query_lens: Sequence[int],
    num_computed_tokens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    logits_indices: Sequence[int] | None = None,
    sliding_window: int | None = None,
    cpu_kernel: bool = False,
    lookahead: int = 1,
) -> ForwardBatch:
    """One step's ForwardBatch from plain lists, one entry per scheduled request.

    input_ids: the step's new tokens, flattened in request order; requests whose query_len is 1 must
      come first (they form the batched decode group), then prefill chunks.
    query_lens: new tokens per request; num_computed_tokens: tokens already in its KV cache;
    block_tables: its KV block ids, covering num_computed + query_len tokens.
    logits_indices: rows to compute logits for (default: each request's last token).
    cpu_kernel: fill the kernel_* fields for engine/kernels/cpu_kernels.py (inference only: it has no autograd).
    lookahead: decode rows only, on the CPU kernel path: the slot table covers this many positions per row from the
      new token's (the block tables must hold them), so advance_decode_batch can move the batch on lookahead - 1 times.
    Masks are built here once per step and shared by every layer.
    """
    if cpu_kernel and query_lens and all(q == 1 for q in query_lens):
        return _decode_batch(input_ids, num_computed_tokens, block_tables, block_size, device, logits_indices,
                             sliding_window, lookahead)
    if lookahead != 1:
        raise ValueError("lookahead is for decode batches on the CPU kernel path")
    return _general_batch(input_ids, query_lens, num_computed_tokens, block_tables, block_size, device,
                          logits_indices, sliding_window, cpu_kernel)


_LANES: dict[tuple[int, str], torch.Tensor] = {}  # (block size, device) -> arange(block size)


def _decode_batch(input_ids: Sequence[int], num_computed_tokens: Sequence[int], block_tables: Sequence[Sequence[int]],
                  block_size: int, device: torch.device | str, logits_indices: Sequence[int] | None,
                  sliding_window: int | None, lookahead: int = 1) -> ForwardBatch:
    """The same ForwardBatch as _general_batch for a step of decode rows only (one new token each) on the CPU
    kernel path, from the lists in plain Python: every int64 of the step goes into one tensor and the fields are
    views of it, with five more operations for the kernel's slot table, instead of ~25 (a step of the 4-bit model
    is ~4 ms: the general path cost 0.3 ms of it, and each tensor operation ~10 us after a step's weights went
    through the caches)."""
    n = len(num_computed_tokens)
    if len(block_tables) != n or len(input_ids) != n:
        raise ValueError("input_ids, query_lens, num_computed_tokens and block_tables disagree in length")
    max_blocks = max(len(b) for b in block_tables)
    positions = list(num_computed_tokens)  # each row's new token sits right after what its cache holds
    width = max(positions) + lookahead
    if width > max_blocks * block_size:
        raise ValueError("a block table is too short for its request's tokens")
    rows = [list(b) + [0] * (max_blocks - len(b)) for b in block_tables]
    logits = range(n) if logits_indices is None else logits_indices
    flat = list(input_ids) + positions
    flat += [row[p // block_size] * block_size + p % block_size for row, p in zip(rows, positions)]
    flat += [p + 1 for p in positions]
    flat += range(n)
    flat += logits
    for row in rows:
        flat += row
    values = torch.tensor(flat, dtype=torch.int64).to(device)
    field = [values[i * n:(i + 1) * n] for i in range(5)]  # ids, positions, slots, lens, rows
    k = len(logits)
    lanes = _LANES.get((block_size, str(device)))
    if lanes is None:
        lanes = _LANES.setdefault((block_size, str(device)), torch.arange(block_size, device=device))
    table = values[5 * n + k:].view(n, max_blocks, 1)
    attn = AttentionMetadata(num_decode_tokens=n, sliding_window=sliding_window)
    # every position's slot, per row (contiguous: each layer's kernel would copy it otherwise)
    attn.kernel_slots = (table * block_size + lanes).view(n, -1)[:, :width].contiguous()
    attn.kernel_lens, attn.kernel_rows = field[3], field[4]
    return ForwardBatch(input_ids=field[0], positions=field[1], slot_mapping=field[2], attn=attn,
                        logits_indices=values[5 * n:5 * n + k])


def advance_decode_batch(batch: ForwardBatch, token_ids: torch.Tensor) -> None:
    """Move a decode batch built with lookahead > 1 on to the next position of every row, in place: `token_ids`
    [rows] are the new tokens (the ones the batch's step sampled). The same fields as a batch built for the next
    position, for positions the slot table covers (an index past it raises)."""
    attn = batch.attn
    if cpu_kernels.loaded() and token_ids.device.type == "cpu" and token_ids.dtype == torch.int64 \
            and token_ids.is_contiguous():  # the same in one call, everything checked before it writes
        torch.ops.loraplex_cpu.advance_decode_(batch.input_ids, batch.positions, batch.slot_mapping, attn.kernel_lens,
                                               attn.kernel_slots, token_ids)
    else:
        batch.input_ids.copy_(token_ids)
        batch.positions.add_(1)
        attn.kernel_lens.add_(1)
        torch.gather(attn.kernel_slots, 1, batch.positions.unsqueeze(1), out=batch.slot_mapping.unsqueeze(1))
    batch.continued = True


def _general_batch(input_ids: Sequence[int], query_lens: Sequence[int], num_computed_tokens: Sequence[int],
                   block_tables: Sequence[Sequence[int]], block_size: int, device: torch.device | str,
                   logits_indices: Sequence[int] | None, sliding_window: int | None, cpu_kernel: bool) -> ForwardBatch:
    n = len(query_lens)
    if n == 0:
        raise ValueError("a step needs at least one scheduled request")
    if not (len(num_computed_tokens) == len(block_tables) == n) or len(input_ids) != sum(query_lens):
        raise ValueError("input_ids, query_lens, num_computed_tokens and block_tables disagree in length")
    q_lens = torch.tensor(query_lens, dtype=torch.int64)  # [n]
    computed = torch.tensor(num_computed_tokens, dtype=torch.int64)
    kv_lens = computed + q_lens  # [n]
    max_blocks = max(len(b) for b in block_tables)
    table = torch.tensor([list(b) + [0] * (max_blocks - len(b)) for b in block_tables], dtype=torch.int64)
    if (kv_lens > len(table[0]) * block_size).any():
        raise ValueError("a block table is too short for its request's tokens")

    # per token: its request and absolute position
    num_tokens = len(input_ids)
    query_starts = torch.cumsum(q_lens, 0) - q_lens  # [n]
    req = torch.repeat_interleave(torch.arange(n), q_lens)  # [num_tokens]
    positions = torch.arange(num_tokens) - query_starts[req] + computed[req]
    slot_mapping = table[req, positions // block_size] * block_size + positions % block_size  # [num_tokens]

    num_decodes = 0
    while num_decodes < n and query_lens[num_decodes] == 1:
        num_decodes += 1
    attn = AttentionMetadata(num_decode_tokens=num_decodes, sliding_window=sliding_window)
    if cpu_kernel:
        _fill_kernel_metadata(attn, table, kv_lens, q_lens, req, positions, block_size, device)
        num_decodes = 0  # the kernel covers them
    if num_decodes:
        lens = kv_lens[:num_decodes]  # [nd]
        cols = torch.arange(int(lens.max())).expand(num_decodes, -1)  # [nd, max_kv_len]
        mask = cols < lens.unsqueeze(1)
        if sliding_window is not None:
            mask &= cols >= (lens - sliding_window).unsqueeze(1)
        attn.decode_kv_slots = torch.where(mask, _slots(table[:num_decodes], cols, block_size), 0)
        attn.decode_mask = mask.view(num_decodes, 1, 1, -1)  # [nd, 1, 1, max_kv_len]
        attn.decode_kv_lens = lens
    for i in range(num_decodes, n):
        q_len, kv_len = query_lens[i], int(kv_lens[i])
        if cpu_kernel and q_len <= KERNEL_MAX_PREFILL_TOKENS:
            continue
        kv_pos = torch.arange(kv_len)  # [kv_len]
        mask = None
        if q_len != kv_len or (sliding_window is not None and sliding_window < kv_len):
            q_pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)  # [q_len, 1]
            mask = kv_pos <= q_pos  # [q_len, kv_len] causal with offset
            if sliding_window is not None:
                mask &= kv_pos > q_pos - sliding_window
            mask = mask.to(device)
        attn.prefills.append(PrefillChunk(query_start=int(query_starts[i]), query_len=q_len,
                                          kv_slots=_slots(table[i], kv_pos, block_size).to(device), mask=mask))

    if logits_indices is None:
        logits = query_starts + q_lens - 1
    else:
        logits = torch.tensor(logits_indices, dtype=torch.int64)
    if num_decodes:
        attn.decode_kv_slots = attn.decode_kv_slots.to(device)
        attn.decode_mask = attn.decode_mask.to(device)
        attn.decode_kv_lens = attn.decode_kv_lens.to(device)
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device),
        positions=positions.to(device),
        slot_mapping=slot_mapping.to(device),
        attn=attn,
        logits_indices=logits.to(device),
    )


def _fill_kernel_metadata(attn: AttentionMetadata, table: torch.Tensor, kv_lens: torch.Tensor, q_lens: torch.Tensor,
                          req: torch.Tensor, positions: torch.Tensor, block_size: int,
                          device: torch.device | str) -> None:
    cols = torch.arange(int(kv_lens.max())).expand(len(kv_lens), -1)  # [n, max_kv_len]
    attn.kernel_slots = _slots(table, cols, block_size).to(device)  # past a row's kv_len: never read
    lens = positions + 1  # causal: a token sees everything up to its own position
    long_chunk = (q_lens > KERNEL_MAX_PREFILL_TOKENS)[req]
    attn.kernel_lens = lens.masked_fill_(long_chunk, 0).to(device)
    attn.kernel_rows = req.to(device)


def allocate_kv_caches(num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device | str = "cpu") -> list[KVCache]:
    """One zeroed flat KVCache per layer: k, v [num_slots, num_kv_heads, head_dim]."""
    return [KVCache(k=torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device),
                    v=torch.zeros(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device))
            for _ in range(num_layers)]
