"""The weight-streaming CPU linears (engine/quant/stream.py, csrc/cpu_stream_linear.cpp) against their plain-torch
references: dense float32/bfloat16 and GPTQ 8/4-bit codes, row-for-row batch invariance, fused siblings, the
engine's greedy tokens and the quantized models' perplexity on the quantization tests' text."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.loader import load_model
from loraplex.engine.quant.gptq import GPTQLinear, export_gptq
from loraplex.engine.quant.stream import (
    StreamLinear,
    can_act_int8,
    can_stream_gptq,
    channel_lanes,
    dequantize_activations,
    from_channel_lanes,
    lane_u8_kind,
    pack_nibbles,
    quantize_activations,
    stream_product,
    unpack_nibbles,
    use_stream_linears,
)
from tests.engine.quant.test_quant import perplexity, text_ids  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")


def dense(in_f: int, out_f: int, bias: bool, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


def gptq(in_f: int, out_f: int, bits: int, group: int, sym: bool, bias: bool, seed: int = 0) -> GPTQLinear:
    torch.manual_seed(seed)
    return GPTQLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), bits=bits, group_size=group, sym=sym)


def test_nibble_layout_round_trips_and_is_the_documented_one():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, 32) and torch.equal(unpack_nibbles(packed), q)
    # byte i of a 16-channel chunk: channel i low, channel i + 8 high
    assert int(packed[2, 3]) == int(q[2, 3]) | (int(q[2, 11]) << 4)
    assert int(packed[2, 8 + 1]) == int(q[2, 17]) | (int(q[2, 25]) << 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,out_f,bias", [(64, 37, True), (576, 192, False), (96, 25, False)])
def test_dense_stream_matches_f_linear(dtype, in_f, out_f, bias):
    linear = dense(in_f, out_f, bias, dtype)
    fast = StreamLinear.from_linear(linear)
    for rows in (1, 2, 5, 17):
        x = torch.randn(rows, in_f).to(dtype)
        want = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
        with torch.inference_mode():
            got = fast(x)
        assert got.dtype == dtype and got.shape == (rows, out_f)
        tol = (1e-5 if dtype == torch.float32 else 1e-2) * want.abs().max()
        assert (got.float() - want).abs().max() <= tol


@pytest.mark.parametrize("bits,group,sym", [(8, 32, True), (8, 64, False), (4, 32, True), (4, 64, False)])
def test_gptq_repack_is_exact_and_the_kernel_matches_the_reference(bits, group, sym):
    ref = gptq(192, 48, bits, group, sym, bias=True)
    assert can_stream_gptq(ref)
    fast = StreamLinear.from_gptq(ref, torch.float32)
    assert torch.equal(fast.dequantized_weight(), ref.dequantized_weight(torch.float32))  # no weight changed
    assert fast.weight_bytes < (192 * 48 * bits // 8) * 1.6  # codes + one float scale and int zero per group
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 192).to(dtype)
        with torch.inference_mode():
            got = fast(x)
        want = ref(x.float())
        tol = (1e-5 if dtype == torch.float32 else 2e-2) * want.abs().max()
        assert got.dtype == dtype and (got.float() - want).abs().max() <= tol


def test_act_order_and_odd_groups_stay_on_the_reference():
    torch.manual_seed(0)
    act_order = GPTQLinear.from_linear(nn.Linear(128, 32), bits=4, group_size=32, desc_act=True)
    g_idx = act_order.g_idx.long()
    assert not torch.equal(g_idx.sort().values, g_idx)  # channels really reordered by act-order
    assert not can_stream_gptq(act_order)
    assert not can_stream_gptq(gptq(96, 32, 4, 24, True, False))  # group not a multiple of 16
    assert can_stream_gptq(gptq(96, 32, 4, 32, True, False))
    model = nn.Sequential()
    model.add_module("proj", act_order)
    assert use_stream_linears(model, torch.float32, dense=False) == 0
    assert model.proj is act_order  # the reference stays


@pytest.mark.parametrize("kind", ["f32", "bf16", "u8", "u4", "u8a8", "u4a8", "u8lanes", "u4lanes"])
def test_each_row_is_the_same_alone_and_in_any_batch(kind):
    if kind in ("f32", "bf16"):
        dtype = torch.float32 if kind == "f32" else torch.bfloat16
        fast = StreamLinear.from_linear(dense(576, 200, True, dtype))
    else:  # 200 outputs: interleaved codes with int8 activations; 208 = 13 lane groups: channel lanes, one unpaired
        dtype = torch.float32
        out = 208 if kind.endswith("lanes") else 200
        fast = StreamLinear.from_gptq(gptq(576, out, 8 if kind.startswith("u8") else 4, 64, False, True), dtype)
        fast.set_act_int8(not kind.endswith(("u8", "u4")))
        assert fast.layout == ("lanes" if out == 208 else "interleaved" if fast.act_int8 else "rows")
    x = torch.randn(37, 576).to(dtype)
    with torch.inference_mode():
        many = fast(x)
        for n in (1, 2, 3, 5, 6, 7, 8, 13):  # every tile shape and tail of the kernel
            part = fast(x[:n])
            assert torch.equal(part, many[:n]), n
        for i in range(0, 37, 6):
            assert torch.equal(fast(x[i:i + 1])[0], many[i])


def test_activation_rounding_is_the_documented_one():
    torch.manual_seed(0)
    x = torch.randn(3, 128) * torch.linspace(0.01, 10, 128)
    x[1, 32:64] = 0  # an all-zero block: scale 0, codes 0
    a, d = quantize_activations(x)
    assert a.dtype == torch.int8 and d.shape == (3, 4)
    blocks = x.reshape(3, 4, 32)
    assert torch.equal(d, blocks.abs().amax(-1) / 127)
    assert int(a.abs().max()) == 127 and bool((a[1, 32:64] == 0).all()) and float(d[1, 1]) == 0
    err = (dequantize_activations(x) - x).reshape(3, 4, 32).abs()
    assert bool((err <= d.unsqueeze(-1) * 0.5 * (1 + 1e-5)).all())  # half a step at most
    # round half to even, as the kernel's conversion: 2.5 steps -> 2, 3.5 -> 4
    y = torch.zeros(1, 32)
    y[0, :3] = torch.tensor([127.0, 2.5, 3.5])
    assert quantize_activations(y)[0][0, :3].tolist() == [127, 2, 4]


@pytest.mark.parametrize("out", [40, 48])  # interleaved codes; channel lanes (a pair of lane groups and one alone)
@pytest.mark.parametrize("bits,group,sym,bias", [(8, 64, True, True), (8, 128, False, False), (4, 64, True, False),
                                                 (4, 128, False, True)])
def test_int8_activations_match_their_reference(bits, group, sym, bias, out):
    """Integer dot products on int8-rounded activations == F.linear of the same weights on the rounded activations
    (up to float32 summation order), and the rounding itself costs little against the weight-only product."""
    ref = gptq(256, out, bits, group, sym, bias=bias)
    fast = StreamLinear.from_gptq(ref, torch.float32)
    assert can_act_int8(fast)
    fast.set_act_int8(True)
    kinds = {40: (5, 6, "interleaved"), 48: (lane_u8_kind(), 8, "lanes")}[out]  # 8-bit lanes: 7, or 9 (AVX2)
    assert fast.kind == kinds[bits == 4] and fast.layout == kinds[2] and "act_int8" in repr(fast)
    for dtype in (torch.float32, torch.bfloat16):
        for rows in (1, 2, 5, 9):
            x = torch.randn(rows, 256).to(dtype)
            with torch.inference_mode():
                got = fast(x)
                want = fast.reference(x)
                exact = ref(x.float())  # weight-only, unrounded activations
            assert got.dtype == want.dtype == dtype and got.shape == (rows, out)
            tol = (1e-5 if dtype == torch.float32 else 1e-2) * want.float().abs().max()
            assert (got.float() - want.float()).abs().max() <= tol
            assert (got.float() - exact).abs().max() <= 0.05 * exact.abs().max()
            if sym:  # one zero point: the kernel takes it alone, and gives the per-group zeros' bits
                assert fast.kernel_zeros.numel() == 1
                # what a call reads: the held per-group zeros swapped for the one zero point (4 bytes), plus the bias
                bias_bytes = 0 if fast.bias is None else fast.bias.numel() * fast.bias.element_size()
                assert fast.kernel_bytes == fast.weight_bytes - fast.zeros.numel() * 4 + 4 + bias_bytes
                with torch.inference_mode():
                    bias_x = None if fast.bias is None else fast.bias.to(dtype)
                    per_group = torch.ops.loraplex_cpu.stream_linear(x, fast.weight, fast.scales, fast.zeros,
                                                                     fast.kind, group, bias_x)
                assert torch.equal(per_group, got)


def kernel_digest() -> str:
    """A digest of the streaming kernel's outputs on fixed inputs where it promises the same bits on every instruction
    set: int8 activations on 8- and 4-bit codes (interleaved and in channel lanes), bfloat16 x bfloat16 (1 and 6 rows). Compared between builds by
    tests/engine/kernels/test_cpu_kernels.py, which builds an AVX2 one."""
    import hashlib
    h = hashlib.sha256()
    bf = StreamLinear.from_linear(dense(320, 56, True, torch.bfloat16, seed=3))
    torch.manual_seed(2)
    for rows in (1, 6):
        with torch.inference_mode():
            h.update(bf(torch.randn(rows, 320).to(torch.bfloat16)).float().numpy().tobytes())
    for bits in (8, 4):
        for out in (56, 48):  # interleaved codes; channel lanes
            fast = StreamLinear.from_gptq(gptq(320, out, bits, 64, False, True, seed=bits), torch.float32)
            fast.set_act_int8(True)
            torch.manual_seed(1)
            for rows in (1, 6):
                x = torch.randn(rows, 320) * 3
                x[0, 64:128] = 0  # a chunk whose scale is 0
                x[-1, 130] = 1e4  # a block where one channel takes the scale and the rest round towards 0
                with torch.inference_mode():
                    h.update(fast(x).numpy().tobytes())
    return h.hexdigest()


def test_int8_activations_need_widths_and_groups_of_64():
    assert not can_act_int8(StreamLinear.from_gptq(gptq(96, 16, 8, 32, True, False), torch.float32))
    assert not can_act_int8(StreamLinear.from_gptq(gptq(128, 16, 4, 32, True, False), torch.float32))
    assert not can_act_int8(StreamLinear.from_linear(dense(128, 16, False, torch.float32)))
    model = nn.Sequential()
    model.add_module("a", gptq(128, 16, 4, 32, True, False))
    model.add_module("b", gptq(128, 16, 8, 64, True, False))
    assert use_stream_linears(model, torch.float32, dense=False, act_int8=True) == 2
    assert not model.a.act_int8 and model.b.act_int8  # the one that cannot stays exact weight-only
    assert model.a.kind == 2 and model.b.kind == lane_u8_kind() and model.b.kernel_zeros.numel() == 1
    with pytest.raises(ValueError, match="multiples of 64"):
        model.a.set_act_int8(True)
    assert not model.a.act_int8 and model.a.kind == 2  # refused: nothing changed
    odd = StreamLinear.from_gptq(gptq(96, 16, 8, 32, True, False), torch.float32)
    with pytest.raises(RuntimeError, match="multiples of 64"):
        torch.ops.loraplex_cpu.stream_linear(torch.randn(1, 96), odd.weight, odd.scales, odd.zeros, 3, 32, None)


@pytest.mark.parametrize("bits", [8, 4])
def test_interleaved_codes_give_the_same_bits_and_weights(bits):
    """With int8 activations the codes of every 4 output channels are interleaved chunk by chunk: the kernel gives the
    plain layout's bits at every batch size, the reference reads the same weights, switching back restores the
    plain codes."""
    from loraplex.engine.quant.stream import IL_ROWS, deinterleave_rows, interleave_rows
    ref = gptq(320, 40, bits, 64, False, True, seed=5)  # (a multiple of 16 would take channel lanes)
    fast = StreamLinear.from_gptq(ref, torch.float32)
    plain_codes, want_w = fast.weight.clone(), fast.dequantized_weight()
    chunks = 320 // 64
    assert torch.equal(deinterleave_rows(interleave_rows(plain_codes, chunks), chunks), plain_codes)
    fast.set_act_int8(True)
    assert fast.interleaved and fast.kind == (5 if bits == 8 else 6) and not torch.equal(fast.weight, plain_codes)
    assert torch.equal(fast.weight, interleave_rows(plain_codes, chunks))
    assert torch.equal(fast.dequantized_weight(), want_w)
    op = torch.ops.loraplex_cpu.stream_linear
    for rows in (1, 3, 6, 17):
        x = torch.randn(rows, 320)
        with torch.inference_mode():
            got = fast(x)
            plain = op(x, plain_codes, fast.scales, fast.kernel_zeros, fast.kind - 2, 64, fast.bias)
        assert torch.equal(got, plain)
    fast.set_act_int8(False)
    assert not fast.interleaved and torch.equal(fast.weight, plain_codes) and fast.kind == (1 if bits == 8 else 2)
    codes = torch.randint(0, 256, (IL_ROWS + 2, 128), dtype=torch.uint8)  # (GPTQ packs 4+ rows: never this odd)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        op(torch.randn(1, 128), codes, torch.ones(IL_ROWS + 2, 2), torch.tensor([128], dtype=torch.int32), 5, 64, None)


@pytest.mark.parametrize("sym", [True, False])
def test_both_8_bit_channel_lane_kinds_give_the_same_bits_on_this_build(sym):
    """Kind 7 (codes as they are) and kind 9 (each stored as q ^ 0x80, what an AVX2 build reads fastest) are both run
    by every build, whichever it prefers (lane_u8_kind): the same bits at 1 and 5 rows, one zero point or many."""
    fast = StreamLinear.from_gptq(gptq(192, 48, 8, 64, sym, True, seed=5), torch.float32)
    fast.set_act_int8(True)
    x = torch.randn(5, 192) * 2
    flipped = fast.weight ^ 0x80
    with torch.inference_mode():
        ran = {}
        for kind, weight in ((fast.kind, fast.weight), (16 - fast.kind, flipped)):  # 7 <-> 9
            ran[kind] = [torch.ops.loraplex_cpu.stream_linear(x[:rows], weight, fast.scales, fast.kernel_zeros, kind,
                                                              64, fast.bias) for rows in (1, 5)]
    assert sorted(ran) == [7, 9]
    assert all(torch.equal(a, b) for a, b in zip(ran[7], ran[9]))
    torch.testing.assert_close(ran[7][1], fast.reference(x), rtol=1e-4, atol=1e-4)  # the rounded activations' product


def test_the_batch_1_prefetch_distance_changes_no_result_and_refuses_bad_values():
    """stream_ahead only moves where a streaming tile prefetches its weights: f32, bf16 and 8/4-bit channel-lane calls
    give the same bits with no prefetch, at the build's distance and at 64 KiB (past the end of every weight here), at
    1 row and 5 (the first row tile over a block prefetches, the later ones not); a negative, unaligned or too large
    distance is refused, the setting kept."""
    linears = [(StreamLinear.from_linear(dense(320, 56, True, torch.float32, seed=1)), torch.float32),
               (StreamLinear.from_linear(dense(320, 56, True, torch.bfloat16, seed=2)), torch.bfloat16)]
    for bits in (8, 4):
        lanes = StreamLinear.from_gptq(gptq(192, 48, bits, 64, False, True, seed=bits), torch.float32)
        lanes.set_act_int8(True)
        assert lanes.layout == "lanes"
        linears.append((lanes, torch.float32))
    default = cpu_kernels.stream_ahead()
    assert default % 64 == 0 and 0 <= default <= 1 << 16
    runs = {}
    try:
        for ahead in (0, default, 1 << 16):
            assert cpu_kernels.stream_ahead(ahead) in (0, default, 1 << 16)
            assert cpu_kernels.stream_ahead() == ahead
            with torch.inference_mode():
                runs[ahead] = [stream_product((torch.randn(rows, linear.in_features, generator=torch.Generator()
                                                           .manual_seed(rows)) * 2).to(dtype), linear)
                               for linear, dtype in linears for rows in (1, 5)]
    finally:
        cpu_kernels.stream_ahead(default)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[default]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1 << 16]))
    for bad in (-64, 100, (1 << 16) + 64):
        with pytest.raises(RuntimeError, match="multiple of 64 bytes"):
            cpu_kernels.stream_ahead(bad)
        assert cpu_kernels.stream_ahead() == default


@pytest.mark.parametrize("bits", [8, 4])
def test_channel_lane_codes_are_the_documented_layout_and_switch_back(bits):
    """With int8 activations and a multiple of 16 output channels, the codes go into channel lanes (kinds 7 and 8):
    each 64-byte vector holds 16 channels' codes of 4 (8-bit) or 8 (4-bit) consecutive inputs, the vectors of every
    two lane groups alternate, a last odd group stands alone; scales and zeros go in lane order. The weights the
    reference reads do not change, and switching back restores the row-order codes, scales and zeros."""
    n, k = 48, 128
    ref = gptq(k, n, bits, 64, False, True, seed=7)
    fast = StreamLinear.from_gptq(ref, torch.float32)
    plain_codes, scales, zeros, want_w = fast.weight.clone(), fast.scales.clone(), fast.zeros.clone(), \
        fast.dequantized_weight()
    q = plain_codes if bits == 8 else unpack_nibbles(plain_codes)  # [n, k] codes
    fast.set_act_int8(True)
    assert fast.layout == "lanes" and fast.kind == (lane_u8_kind() if bits == 8 else 8)
    flat = fast.weight.reshape(-1)
    per_vector = 4 if bits == 8 else 8  # inputs per 64-byte vector
    group_bytes = k // per_vector * 64
    for g, c, v, t in [(0, 0, 0, 0), (0, 5, 3, 2), (1, 15, 0, 3), (1, 7, k // per_vector - 1, 1), (2, 9, 5, 0)]:
        at = g // 2 * 2 * group_bytes + (v * 128 + g % 2 * 64 if g < 2 else v * 64) + 4 * c + t
        channel, first = 16 * g + c, per_vector * v + t
        want = int(q[channel, first]) if bits == 8 else int(q[channel, first]) | int(q[channel, first + 4]) << 4
        assert int(flat[at]) == want ^ (0x80 if fast.signed_lanes else 0), (g, c, v, t)
    assert float(fast.scales.reshape(-1)[2 * 16 + 16 + 3]) == float(scales[16 + 3, 1])  # [n / 16, groups, 16]
    assert torch.equal(from_channel_lanes(channel_lanes(q, bits), bits), q)
    assert torch.equal(fast.codes(), plain_codes) and torch.equal(fast.dequantized_weight(), want_w)
    fast.set_act_int8(False)
    assert fast.layout == "rows" and fast.kind == (1 if bits == 8 else 2)
    assert torch.equal(fast.weight, plain_codes) and torch.equal(fast.scales, scales) and torch.equal(fast.zeros, zeros)
    x = torch.randn(3, k)
    with torch.inference_mode():  # a layout picked by name (benchmarks compare them): the same weights either way
        outs = {}
        for layout in ("interleaved", "lanes", "rows"):
            fast.set_act_int8(True, layout=layout)
            assert fast.layout == layout and torch.equal(fast.dequantized_weight(), want_w)
            outs[layout] = fast(x)
        assert all(torch.allclose(o, outs["lanes"], rtol=1e-5, atol=1e-5 * float(o.abs().max())) for o in outs.values())
    narrow = StreamLinear.from_gptq(gptq(k, 40, bits, 64, False, True), torch.float32)
    with pytest.raises(ValueError, match="layout 'lanes' is not one of"):
        narrow.set_act_int8(True, layout="lanes")
    assert not narrow.act_int8 and narrow.layout == "rows"  # refused: nothing changed
    codes = torch.zeros(40, k if bits == 8 else k // 2, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.loraplex_cpu.stream_linear(torch.randn(1, k), codes, torch.ones(40, 2), torch.tensor([8], dtype=torch.int32),
                                             7 if bits == 8 else 8, 64, None)


def test_fused_siblings_and_the_output_head():
    torch.manual_seed(0)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32, bias=False)

    model = nn.Module()
    model.attn = Attn()
    model.lm_head = nn.Linear(64, 100, bias=False)
    plain = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
             for n, m in [("q", model.attn.q_proj), ("k", model.attn.k_proj), ("v", model.attn.v_proj),
                          ("head", model.lm_head)]}
    assert use_stream_linears(model, torch.float32) == 4
    assert model.attn.q_proj.group is model.attn.v_proj.group is not None
    x = torch.randn(3, 64)
    with torch.inference_mode():
        outs = {"q": model.attn.q_proj(x), "k": model.attn.k_proj(x), "v": model.attn.v_proj(x),
                "head": model.lm_head(x)}
    for name, (w, b) in plain.items():
        assert torch.allclose(outs[name], F.linear(x, w, b), atol=1e-5), name
        member = {"q": model.attn.q_proj, "k": model.attn.k_proj, "v": model.attn.v_proj, "head": model.lm_head}[name]
        assert torch.equal(member.dequantized_weight(), w)
    # with autograd on (training through the frozen base) the reference path runs and gradients reach x
    xg = torch.randn(2, 64, requires_grad=True)
    model.attn.k_proj(xg).sum().backward()
    assert torch.allclose(xg.grad, plain["k"][0].sum(0).expand(2, -1), atol=1e-5)


def greedy(engine, prompts, max_tokens=16):
    from loraplex.engine.core.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.token_ids)
    return [out[f"r{i}"] for i in range(len(prompts))]


def test_auto_streams_where_it_is_faster():
    """--cpu-linear auto: bfloat16 streams at every batch size, float32 for at most 16 sequences; 'stream' and
    'onednn' are what they say."""
    from loraplex.engine.kernels import cpu_kernels
    from loraplex.engine.llm_engine import choose_cpu_linear
    if not cpu_kernels.available():
        pytest.skip("no CPU kernels")
    cpu = torch.device("cpu")
    assert choose_cpu_linear("auto", cpu, torch.bfloat16, 1) is True
    assert choose_cpu_linear("auto", cpu, torch.bfloat16, 256) is True
    assert choose_cpu_linear("auto", cpu, torch.float32, 16) is True
    assert choose_cpu_linear("auto", cpu, torch.float32, 17) is False
    assert choose_cpu_linear("stream", cpu, torch.float32, 64) is True
    assert choose_cpu_linear("onednn", cpu, torch.bfloat16, 1) is None
    assert choose_cpu_linear("auto", torch.device("meta"), torch.float32, 1) is None


@pytest.mark.slow
def test_engine_greedy_tokens_stream_vs_onednn_and_alone_vs_batched(default_model_dir):
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    tokens = {}
    for mode in ("onednn", "stream"):
        engine = LLMEngine.from_engine_args(EngineArgs(model=default_model_dir, dtype="float32", cpu_linear=mode,
                                                       max_num_seqs=8, kv_cache_memory_bytes=64 << 20))
        prompts = [engine.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):",
                                                         "List three colours:", "Once upon a time")]
        tokens[mode] = greedy(engine, prompts)
        if mode == "stream":
            assert any(isinstance(m, StreamLinear) for m in engine.runner.model.modules())
            alone = [greedy(engine, [p])[0] for p in prompts]
            assert alone == tokens[mode]  # batch invariance: alone == in a batch of four, exactly
    assert tokens["stream"] == tokens["onednn"]


@pytest.mark.slow
def test_streamed_gptq_models_keep_their_perplexity(default_model_dir, text_ids, tmp_path):  # noqa: F811
    """8-bit and 4-bit GPTQ (groups of 64) through the kernel: weight-only, the same perplexity as their plain-torch
    references (the weights are the same; only the summation order differs); with int8 activations, within 2 % of
    that; both close to the unquantized model's."""
    base, config = load_model(default_model_dir, torch.float32)
    with torch.inference_mode():
        base_ppl = perplexity(base, config, text_ids)
    results = {}
    for bits in (8, 4):
        folder = export_gptq(default_model_dir, tmp_path / f"g{bits}", bits=bits, group_size=64, sym=True)
        model, config = load_model(folder, torch.float32)
        with torch.inference_mode():
            ref_ppl = perplexity(model, config, text_ids)
            assert use_stream_linears(model, torch.float32, dense=False, act_int8=True) == 7 * config.num_hidden_layers
            assert sum(getattr(m, "act_int8", False) for m in model.modules()) == 7 * config.num_hidden_layers
            a8_ppl = perplexity(model, config, text_ids)
            for m in model.modules():  # back to weight-only on the same StreamLinears
                if isinstance(m, StreamLinear):
                    m.set_act_int8(False)
            fast_ppl = perplexity(model, config, text_ids)
        results[bits] = (ref_ppl, fast_ppl, a8_ppl)
        assert abs(fast_ppl - ref_ppl) <= 1e-3 * ref_ppl
        assert a8_ppl <= 1.02 * ref_ppl  # rounding activations to int8 per 32 channels costs under 2 %
    print({"base": round(base_ppl, 3), **{f"{b}-bit": tuple(round(v, 3) for v in r) for b, r in results.items()}})
    assert results[8][2] <= 1.03 * base_ppl
    assert results[4][2] <= 1.35 * base_ppl
