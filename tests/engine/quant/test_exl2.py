"""EXL2 reference: bit-stream packing against exllamav2's pack loops, a hand-built mixed-bit matrix, RTN error
bounds, EXL2Linear, export and loading (lm_head too), the engine, and exllamav2's own kernels on CUDA."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loraplex.engine.loader import load_model
from loraplex.engine.quant.exl2 import (
    SUPPORTED_BITS,
    EXL2Linear,
    dequantize_exl2,
    exl2_param_names,
    export_exl2,
    pack_exl2_rows,
    quantize_exl2_rtn,
    unpack_exl2_rows,
)
from tests.engine.test_cuda import tiny_model_dir  # noqa: F401 - fixture

M32 = 0xFFFFFFFF


def exllama_pack_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """exllamav2 pack_tensor.cu pack_columns_kernel, transcribed loop by loop: [rows, columns] -> int32
    [rows * bits / 32, columns]. Each (out_row, column) is one CUDA thread; 3/5/6-bit threads run on every
    bits-th (3rd for 6-bit) out_row and write that many words."""
    inp = values.astype(np.uint64)
    out_rows, columns = inp.shape[0] * bits // 32, inp.shape[1]
    out = np.zeros((out_rows, columns), dtype=np.uint64)

    def wshift(x, j):
        if j < 0:
            return 0 if j <= -32 else x >> (-j)
        return 0 if j >= 32 else (x << j) & M32

    for column in range(columns):
        for out_row in range(out_rows):
            if bits in (2, 4, 8):
                row, packed = out_row * 32 // bits, 0
                for i in range(32 // bits):
                    packed |= (int(inp[row + i, column]) << (i * bits)) & M32
                out[out_row, column] = packed
            else:
                words = {3: 3, 5: 5, 6: 3}[bits]
                count = {3: 32, 5: 32, 6: 16}[bits]
                if out_row % words:
                    continue
                row = out_row * 32 // bits
                packed = [0] * words
                for i in range(count):
                    x, j = int(inp[row + i, column]), i * bits
                    for w in range(words):
                        packed[w] |= wshift(x, j - 32 * w)
                for w in range(words):
                    out[out_row + w, column] = packed[w]
    return out.astype(np.uint32).view(np.int32)


def exllama_pack_rows_4(qscale: np.ndarray) -> np.ndarray:
    """pack_rows_4_kernel: uint16 qscale in [1, 16] [rows, columns] -> int32 [rows, columns / 8], x - 1 per nibble."""
    x = (qscale.astype(np.uint64) - 1).reshape(qscale.shape[0], -1, 8)
    return (x << (np.arange(8, dtype=np.uint64) * 4)).sum(-1).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("rows,columns", [(32, 5), (96, 33), (45, 1), (7, 13), (64, 96)])
def test_pack_unpack_round_trip(bits, rows, columns):
    g = torch.Generator().manual_seed(bits * rows + columns)
    values = torch.randint(0, 2**bits, (rows, columns), generator=g, dtype=torch.int32)
    packed = pack_exl2_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (-(-rows * bits // 32), columns)
    assert torch.equal(unpack_exl2_rows(packed, bits, rows), values)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_matches_exllama_pack_columns(bits):
    values = torch.randint(0, 2**bits, (64, 7), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    ref = exllama_pack_columns(values.numpy(), bits)
    assert np.array_equal(pack_exl2_rows(values, bits).numpy(), ref)
    assert torch.equal(unpack_exl2_rows(torch.from_numpy(ref), bits, 64), values)


def test_pack_literal_words():
    ramp = torch.arange(32)[:, None]  # one column 0..31
    assert pack_exl2_rows(ramp % 16, 4)[:, 0].tolist() == [0x76543210, -0x1234568, 0x76543210, -0x1234568]
    assert pack_exl2_rows(ramp % 4, 2)[:, 0].tolist() == [-0x1B1B1B1C, -0x1B1B1B1C]  # 0xE4E4E4E4
    # 3 bits: value i at bits [3i, 3i + 3) of three words; ones everywhere fill all 96 bits
    assert pack_exl2_rows(torch.full((32, 1), 7), 3)[:, 0].tolist() == [-1, -1, -1]
    # value 1 at i = 10 straddles words 0 and 1: bit 30 of word 0; value 4 at i = 21 lands on bit 65
    v = torch.zeros(32, 1, dtype=torch.int32)
    v[10], v[21] = 1, 4
    assert pack_exl2_rows(v, 3)[:, 0].tolist() == [1 << 30, 0, 1 << 1]


def test_unpack_errors():
    with pytest.raises(ValueError, match="take 3 int32 rows"):
        unpack_exl2_rows(torch.zeros(2, 4, dtype=torch.int32), 3, 32)
    with pytest.raises(ValueError, match="bits"):
        pack_exl2_rows(torch.zeros(32, 4, dtype=torch.int32), 7)


def test_hand_built_mixed_bit_matrix():
    """K = 64 rows: a 6-bit group then a 3-bit group, N = 8 columns padded to 32, a reversed permutation;
    packed with the transcribed exllamav2 loops, the expected weight written from the format's formula."""
    k, n, n_pad = 64, 8, 32
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 64, (32, n_pad)), rng.integers(0, 8, (32, n_pad))])  # [K, N_pad]
    values[:32, n:], values[32:, n:] = 32, 4  # padded columns hold 2^(bits-1), as AdaptiveGPTQ.pack writes
    qscale = rng.integers(1, 17, (2, n_pad))  # [G, N_pad]
    scale_max = np.array([0.5, 0.125], dtype=np.float16)  # powers of two: every scale below is exact
    invperm = np.arange(k)[::-1].copy()
    tensors = {
        "q_weight": torch.from_numpy(np.concatenate([exllama_pack_columns(values[:32], 6),
                                                     exllama_pack_columns(values[32:], 3)])),  # [6 + 3, N_pad]
        "q_groups": torch.tensor([6, 0, 3, 6], dtype=torch.int16),
        "q_scale": torch.from_numpy(exllama_pack_rows_4(qscale)),
        "q_scale_max": torch.from_numpy(scale_max),
        "q_invperm": torch.from_numpy(invperm).to(torch.int32),
    }
    zero = np.array([32] * 32 + [4] * 32)[:, None]
    group = np.array([0] * 32 + [1] * 32)
    qd = (values - zero) * qscale[group] ** 2 * scale_max.astype(np.float64)[group, None] / 256  # [K, N_pad]
    expected = qd[invperm, :n].T  # [N, K]
    assert dequantize_exl2(tensors, k, n).tolist() == expected.tolist()
    linear = EXL2Linear.from_tensors(tensors, k, n)
    assert linear.group_bits == (6, 3) and linear.group_rows == (32, 32) and linear.bits_per_weight == 4.5
    assert linear.dequantized_weight().tolist() == expected.tolist()


def element_scales(t: dict, in_features: int, out_features: int) -> torch.Tensor:
    """The scale of each element of Qd [K, N] (quantization order), from the stored tensors."""
    from loraplex.engine.quant.exl2 import _group_layout, _scales
    layout = _group_layout(t["q_groups"], t["q_weight"].shape[0], in_features)
    group = torch.repeat_interleave(torch.arange(len(layout)), torch.tensor([r for _, _, r in layout]))
    return _scales(t["q_scale"], t["q_scale_max"])[group, :out_features], layout, group


def check_rtn_bound(weight: torch.Tensor, t: dict, perm: torch.Tensor | None = None) -> None:
    """Round to nearest on each element's grid {-2^(b-1), ..., 2^(b-1) - 1} * scale: the error is at most half a
    step, plus how far the value lies beyond the grid's ends (4-bit qscale rounding can shrink a column's
    scale below its range: find_params accepts that clipping)."""
    out_f, in_f = weight.shape
    x = weight.t() if perm is None else weight.t()[perm]  # [K, N], quantization order
    s, layout, group = element_scales(t, in_f, out_f)
    half = torch.tensor([2 ** (b - 1) for b, _, _ in layout], dtype=torch.float32)[group, None]  # [K, 1]
    w = dequantize_exl2(t, in_f, out_f)  # [N, K]
    err = (w.t() if perm is None else w.t()[perm]) - x
    beyond = torch.maximum(x - (half - 1) * s, -half * s - x).clamp(min=0)
    assert (err.abs() <= (s / 2 + beyond) * (1 + 1e-5) + 1e-7).all()
    return err, s, beyond


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape,group_size", [((48, 96), 32), ((33, 200), 64), ((96, 128), 128)])
def test_rtn_error_bound(bits, shape, group_size):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(bits)) * 0.05
    out_f, in_f = shape
    t = quantize_exl2_rtn(weight, bits, group_size)
    n_pad, groups = -(-out_f // 32) * 32, -(-in_f // group_size)
    assert t["q_weight"].shape == (sum(-(-min(group_size, in_f - g * group_size) * bits // 32)
                                       for g in range(groups)), n_pad)
    assert t["q_groups"].dtype == torch.int16 and t["q_groups"][0::2].tolist() == [bits] * groups
    assert t["q_scale"].shape == (groups, n_pad // 8) and t["q_scale"].dtype == torch.int32
    assert t["q_scale_max"].shape == (groups,) and t["q_scale_max"].dtype == torch.float16
    assert t["q_invperm"].tolist() == list(range(in_f)) and t["q_invperm"].dtype == torch.int32
    err, s, _ = check_rtn_bound(weight, t)
    # clipping past half a step is the exception: columns whose 4-bit qscale rounded down, and (6 and 8 bits)
    # groups whose q_scale_max / 256 is an fp16 subnormal, so the kernel's scale comes out a little small
    assert (err.abs() > s / 2 * (1 + 1e-5)).float().mean() < 0.05 and (err.abs() / s).mean() < 0.35
    # the p search (find_params, norm 3.5) lowers the largest errors
    t_p = quantize_exl2_rtn(weight, bits, group_size, p_grid=10)
    err_p, s_p, _ = check_rtn_bound(weight, t_p)
    assert err_p.abs().pow(3.5).sum() <= err.abs().pow(3.5).sum() * 1.05
    assert (err_p.abs() > s_p / 2 * (1 + 1e-5)).float().mean() < 0.05


def test_padded_columns_are_stored_as_exllamav2_writes_them():
    t = quantize_exl2_rtn(torch.randn(40, 64), 5, 32)  # N = 40 -> N_pad = 64
    q = unpack_exl2_rows(t["q_weight"], 5, 64)
    assert (q[:, 40:] == 16).all()
    assert (t["q_scale"][:, 5:] == -1).all()  # padded qscale: every nibble 15 (0 - 1 wrapped in pack_rows_4)


def test_mixed_bits_in_one_matrix():
    weight = torch.randn(37, 256, generator=torch.Generator().manual_seed(5)) * 0.1
    bits = [8, 6, 6, 5, 4, 4, 3, 2]
    t = quantize_exl2_rtn(weight, bits, 32)
    words = [32 * b // 32 for b in bits]
    assert t["q_groups"].tolist() == [v for b, start in zip(bits, np.cumsum([0] + words[:-1])) for v in (b, start)]
    assert t["q_weight"].shape == (sum(words), 64)
    err, s, _ = check_rtn_bound(weight, t)
    group_err = err.abs().reshape(8, 32, -1).mean((1, 2))  # fewer bits, larger errors
    assert (group_err[1:] >= group_err[:-1] * 0.8).all() and group_err[-1] > 10 * group_err[0]
    linear = EXL2Linear.from_tensors(t, 256, 37)
    assert linear.group_bits == tuple(bits) and linear.bits_per_weight == sum(bits) / 8
    with pytest.raises(ValueError, match="highest to lowest"):
        quantize_exl2_rtn(weight, [4, 8, 6, 6, 5, 4, 3, 2], 32)
    with pytest.raises(ValueError, match="8 groups"):
        quantize_exl2_rtn(weight, [8, 4], 32)


def test_permuted_rows_recover_the_weight():
    """exllamav2 quantizes rows in act-order: Qd[k] is input row perm[k]; W = Qd[invperm].T puts them back."""
    weight = torch.randn(24, 160, generator=torch.Generator().manual_seed(2))
    weight[:, 17] *= 20  # an outlier channel, as act-order would put first
    perm = torch.randperm(160, generator=torch.Generator().manual_seed(3))
    t = quantize_exl2_rtn(weight, 4, 32, perm=perm)
    assert torch.equal(t["q_invperm"].long(), torch.argsort(perm))
    check_rtn_bound(weight, t, perm)
    same = quantize_exl2_rtn(weight[:, perm], 4, 32)  # the permuted matrix, identity order
    assert torch.equal(t["q_weight"], same["q_weight"]) and torch.equal(t["q_scale"], same["q_scale"])
    assert torch.equal(dequantize_exl2(t, 160, 24), dequantize_exl2(same, 160, 24)[:, torch.argsort(perm)])
    # as exllamav2 loads it: int16 invperm, q_perm = argsort(invperm)
    as_loaded = {**t, "q_invperm": t["q_invperm"].to(torch.int16), "q_perm": perm.to(torch.int16)}
    assert torch.equal(EXL2Linear.from_tensors(as_loaded, 160, 24).dequantized_weight(), dequantize_exl2(t, 160, 24))
    with pytest.raises(ValueError, match="q_perm"):
        EXL2Linear.from_tensors({**as_loaded, "q_perm": torch.arange(160)}, 160, 24)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("in_f,out_f,bias,bits", [(96, 40, True, 4), (200, 13, False, 3), (64, 33, True, [8, 4]),
                                                  (128, 64, False, 6)])
def test_exl2_linear_matches_dequantized_f_linear(dtype, atol, in_f, out_f, bias, bits):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=bias)
    qlinear = EXL2Linear.from_linear(linear, bits, group_size=32)
    assert not list(qlinear.parameters())
    x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
    y = qlinear(x)
    assert y.shape == (3, 5, out_f) and y.dtype == dtype
    w = qlinear.dequantized_weight(dtype)
    b = None if qlinear.bias is None else qlinear.bias.to(dtype)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=atol, rtol=0)
    y.float().square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, w, b).float().square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=atol * 10, rtol=1e-2)
    assert all(not t.requires_grad and t.grad is None for t in qlinear.buffers())
    close = F.linear(x.detach().float(), linear.weight.detach(), linear.bias)
    assert (y.detach().float() - close).abs().mean() < 0.2 * close.abs().mean()


def test_state_dict_names_and_bytes():
    torch.manual_seed(0)
    qlinear = EXL2Linear.from_linear(nn.Linear(256, 40, bias=True), 4, 32)
    names = exl2_param_names("model.layers.0.mlp.up_proj", bias=True)
    assert sorted(qlinear.state_dict()) == sorted(n.rsplit(".", 1)[1] for n in names)
    # q_weight 256 * 4 / 32 rows x 64, q_groups 2 * 8, q_scale 8 x 8, q_scale_max 8, q_invperm 256
    assert qlinear.weight_bytes == 32 * 64 * 4 + 16 * 2 + 8 * 8 * 4 + 8 * 2 + 256 * 4
    assert qlinear.bias.dtype == torch.float16 and "bits_per_weight=4.00" in repr(qlinear)


def test_from_tensors_errors():
    t = quantize_exl2_rtn(torch.randn(40, 96), [8, 4, 4], 32)  # q_groups (8, 0), (4, 8), (4, 12); 16 rows
    cases = [
        ({"q_scale": t["q_scale"][:, :4]}, "q_scale has shape"),
        ({"q_scale_max": t["q_scale_max"][:2]}, "q_scale_max has shape"),
        ({"q_weight": t["q_weight"][:, :40]}, "padded to a multiple of 32"),
        ({"q_weight": t["q_weight"][:-1]}, "q_weight has 15 rows"),
        ({"q_groups": torch.tensor([8, 0, 4, 8, 4, 20], dtype=torch.int16)}, "cover 128 rows, but in_features is 96"),
        ({"q_groups": torch.tensor([8, 0, 4, 8, 4, 12, 4], dtype=torch.int16)}, "pairs"),
        ({"q_groups": torch.tensor([7, 0, 4, 8, 4, 12], dtype=torch.int16)}, "bits must be one of"),
        ({"q_groups": torch.tensor([8, 1, 4, 8, 4, 12], dtype=torch.int16)}, "starts at q_weight row 1"),
        ({"q_groups": torch.tensor([8, 0, 3, 8, 4, 9], dtype=torch.int16)}, "whole number of 3-bit rows"),
        ({"q_groups": torch.tensor([4, 0, 8, 4, 4, 12], dtype=torch.int16)}, "highest to lowest"),
        ({"q_invperm": torch.zeros(96, dtype=torch.int32)}, "not a permutation"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            EXL2Linear.from_tensors({**t, **change}, 96, 40)
    with pytest.raises(ValueError, match="lack"):
        EXL2Linear.from_tensors({k: v for k, v in t.items() if k != "q_scale_max"}, 96, 40)
    with pytest.raises(ValueError, match="bias"):
        EXL2Linear.from_tensors(t, 96, 40, bias=torch.zeros(41))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_exl2_rtn(torch.randn(40, 96), 4, 48)


# ---------------------------------------------------------------- export and load


def tiny_llama(tmp_path, tie: bool):
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                      tie_word_embeddings=tie, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # wider than the default init, so quantization error shows in the logits
    src = tmp_path / "src"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    return src


def dequantized_twin(quantized: nn.Module, dense: nn.Module) -> nn.Module:
    """`dense` with every EXL2Linear's dequantized weight (and fp16 bias) copied in."""
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, EXL2Linear):
                target = dense.get_submodule(name)
                target.weight = nn.Parameter(module.dequantized_weight(), requires_grad=False)  # unties a head
                if module.bias is not None:
                    target.bias.copy_(module.bias.float())
    return dense


@pytest.mark.parametrize("tie", [False, True])
def test_export_and_load_match_the_dequantized_model(tmp_path, tie):
    from tests.engine.test_loader import our_logits
    src = tiny_llama(tmp_path, tie)
    messages: list[str] = []
    out = export_exl2(src, tmp_path / "exl2", bits=4, group_size=32, head_bits=6, p_grid=10,
                      progress=messages.append)
    assert [m.split(":")[0] for m in messages] == (["lm_head"] if not tie else []) + ["layer 1/2", "layer 2/2"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "exl2", "version": "0.3.2", "bits": 4.0,
                                          "head_bits": 16 if tie else 6, "group_size": 32, "calibration": None}
    assert (out / "tokenizer_config.json").is_file() and [p.name for p in out.glob("*.safetensors")] == \
        ["model.safetensors"]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert not [n for n in tensors if n.endswith("_proj.weight")]
    assert ("lm_head.q_weight" in tensors) == (not tie) and "lm_head.weight" not in tensors
    for name in exl2_param_names("model.layers.1.self_attn.k_proj", bias=True):
        assert name in tensors
    assert tensors["model.layers.1.self_attn.k_proj.bias"].dtype == torch.float16
    assert tensors["model.layers.0.mlp.down_proj.q_weight"].shape == (96 // 8, 64)  # K = 96 at 4 bits, N = 64

    model, config = load_model(out, torch.float32)
    assert model.quant_method == "exl2"
    assert sum(isinstance(m, EXL2Linear) for m in model.modules()) == 14 + (not tie)
    dense = dequantized_twin(model, load_model(src, torch.float32)[0])
    ids = torch.randint(0, 120, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = our_logits(model, config, ids)
    torch.testing.assert_close(ours, our_logits(dense, config, ids), atol=1e-4, rtol=0)
    original = our_logits(load_model(src, torch.float32)[0], config, ids)
    assert (ours - original).abs().mean() < 0.2 * original.abs().mean()  # and still near the original


def test_quantized_head_of_a_tied_model(tmp_path):
    """exllamav2 quantizes the head of a tied model too: lm_head.q_* beside a dense embedding."""
    from tests.engine.test_loader import our_logits
    src = tiny_llama(tmp_path, tie=True)
    out = export_exl2(src, tmp_path / "exl2", p_grid=0)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    head = quantize_exl2_rtn(tensors["model.embed_tokens.weight"], [8, 6], 32)
    save_file({**tensors, **{f"lm_head.{k}": v for k, v in head.items()}}, str(out / "model.safetensors"))
    model, config = load_model(out, torch.float32)
    assert isinstance(model.lm_head, EXL2Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    torch.testing.assert_close(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    dense = dequantized_twin(model, load_model(src, torch.float32)[0])
    ids = list(range(3, 19))
    torch.testing.assert_close(our_logits(model, config, ids), our_logits(dense, config, ids), atol=1e-4, rtol=0)


def test_load_detects_exl2_tensors_and_refuses_mismatches(tmp_path):
    src = tiny_llama(tmp_path, tie=False)
    out = export_exl2(src, tmp_path / "exl2", p_grid=0)
    cfg = json.loads((out / "config.json").read_text())
    without = {k: v for k, v in cfg.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(without))
    model, _ = load_model(out, torch.float32)  # no quantization_config: the *.q_weight names say EXL2
    assert model.quant_method == "exl2" and isinstance(model.model.layers[0].mlp.up_proj, EXL2Linear)
    (out / "config.json").write_text(json.dumps({**without, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="EXL2 tensors"):
        load_model(out, torch.float32)
    (src / "config.json").write_text(json.dumps({**without, "quantization_config": {"quant_method": "exl2"}}))
    with pytest.raises(ValueError, match="no EXL2 tensors"):
        load_model(src, torch.float32)
    (out / "config.json").write_text(json.dumps(cfg))
    with safe_open(out / "model.safetensors", framework="pt") as f:  # a broken linear names itself
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    name = "model.layers.1.mlp.up_proj.q_scale"
    tensors[name] = tensors[name][:, :2].contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: EXL2 q_scale"):
        load_model(out, torch.float32)


def test_engine_serves_an_exl2_folder(tiny_model_dir, tmp_path):  # noqa: F811
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    from tests.adapters.test_lora_engine import run
    out = export_exl2(tiny_model_dir, tmp_path / "exl2", bits=4, group_size=32, p_grid=0)
    # the same weights, dequantized, as a dense folder
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.suffix != ".safetensors":
            (dense_dir / path.name).write_bytes(path.read_bytes())
    model, _ = load_model(out, torch.float32)
    dense = dequantized_twin(model, load_model(tiny_model_dir, torch.float32)[0])
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()},
              str(dense_dir / "model.safetensors"))

    def engine(path, quantization):
        return LLMEngine.from_engine_args(EngineArgs(model=str(path), dtype="float32", quantization=quantization,
                                                     max_model_len=128, num_gpu_blocks_override=32))

    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = {"a": list(range(3, 14)), "b": [5, 9, 2, 7]}
    quantized = run(engine(out, "exl2"), {k: (p, greedy, None) for k, p in prompts.items()})
    assert all(len(v) == 8 for v in quantized.values())
    assert quantized == run(engine(dense_dir, "none"), {k: (p, greedy, None) for k, p in prompts.items()})
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        engine(out, "gptq")


# ---------------------------------------------------------------- exllamav2's kernels


@pytest.mark.cuda
@pytest.mark.parametrize("in_f,out_f,bits", [(256, 100, [8, 6, 6, 5, 4, 4, 3, 2]), (576, 192, 4), (512, 64, 3)])
def test_exllamav2_kernels_read_our_tensors(in_f, out_f, bits):
    """exllamav2's make_q_matrix + reconstruct / gemm_half_q_half on the exported tensors against
    dequantize_exl2 (fp16): the same layout, scale rounding, padding and permutation."""
    try:
        from exllamav2 import ext
    except Exception as exc:  # not installed, or its extension did not build
        pytest.skip(f"exllamav2 unavailable: {type(exc).__name__}: {exc}")
    torch.manual_seed(0)
    weight = torch.randn(out_f, in_f) * 0.05
    perm = torch.randperm(in_f)
    t = quantize_exl2_rtn(weight, bits, 32, perm=perm, p_grid=10)
    ref = dequantize_exl2(t, in_f, out_f, torch.float32).cuda()  # [N, K]
    n_pad = t["q_weight"].shape[1]
    bias = torch.randn(n_pad, dtype=torch.float16)  # the kernel adds a bias as wide as q_weight
    # make_q_matrix shuffles q_weight and rescales q_scale_max in place: hand it copies
    w = {k: v.cuda().clone() for k, v in t.items()}
    w["q_perm"] = torch.argsort(t["q_invperm"].long()).to(torch.int16).cuda()  # as exllamav2's module.py
    w["bias"] = bias.cuda()
    temp_dq = torch.empty(in_f * n_pad, dtype=torch.float16, device="cuda")
    handle = ext.make_q_matrix(w, temp_dq, max_dq_rows=in_f)  # K <= max_dq_rows: big batches reconstruct
    rebuilt = torch.empty(in_f, n_pad, dtype=torch.float16, device="cuda")
    ext.ext_c.reconstruct(handle, rebuilt)  # [K, N_pad], original row order
    torch.testing.assert_close(rebuilt[:, :out_f].t().float(), ref.half().float(), atol=1e-6, rtol=2e-3)
    for rows in (5, 64):  # the quantized GEMM kernel; above MAX_Q_GEMM_ROWS (32), reconstruct + cuBLAS where
        # K is a multiple of 128 (row_step in q_gemm.cu), else the kernel again
        x = torch.randn(rows, in_f, dtype=torch.float16, device="cuda")
        y = torch.empty(rows, n_pad, dtype=torch.float16, device="cuda")
        ext.ext_c.gemm_half_q_half(x, handle, y, False)
        expected = x.float() @ ref.t() + bias[:out_f].float().cuda()
        assert (y[:, :out_f].float() - expected).abs().max() <= 1e-2 * expected.abs().max()
