"""GPTQ reference: packing, RTN error bounds, the v1 zero-point layout on hand-built values, GPTQLinear, export."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from loraplex.engine.quant.gptq import (
    GPTQLinear,
    dequantize,
    export_gptq,
    gptq_param_names,
    pack_int,
    quantize_rtn,
    unpack_int,
)

U32 = 2**32


def signed32(x: int) -> int:
    return x - U32 if x >= 2**31 else x


def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ qlinear_cuda_old.pack's loop, transcribed: [in, out] -> [in * bits // 32, out] int32."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 32 // bits):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,dim", [((32, 8), 0), ((3, 40), 1), ((2, 24, 5), 1), ((8,), 0), ((5, 7, 16), -1)])
def test_pack_unpack_round_trip(bits, shape, dim):
    pack = 32 // bits
    values = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_int(values, bits, dim)
    assert packed.dtype == torch.int32 and packed.shape[dim] == shape[dim] // pack
    assert torch.equal(unpack_int(packed, bits, dim), values)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_autogptq_loop(bits):
    values = torch.randint(0, 2**bits, (64, 24), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    ref = autogptq_pack_rows(values.numpy(), bits)
    assert np.array_equal(pack_int(values, bits, dim=0).numpy(), ref)
    assert np.array_equal(pack_int(values.t(), bits, dim=1).numpy(), ref.T)  # qzeros: packed along dim 1


def test_pack_errors():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int(torch.zeros(12, dtype=torch.int32), 4, 0)
    with pytest.raises(ValueError, match="bits"):
        pack_int(torch.zeros(32, dtype=torch.int32), 3, 0)


def test_hand_built_v1_layout():
    """in=32, out=8, one group of 32: literal int32 words computed by hand from the published layout."""
    q = (torch.arange(32)[:, None] + torch.arange(8)[None, :]) % 16  # [in, out]
    # column 0 holds 0..15, 0..15: rows pack 0..7 -> 0x76543210, 8..15 -> 0xFEDCBA98 (negative as int32)
    qweight = pack_int(q, 4, dim=0)  # [4, 8]
    assert qweight[:, 0].tolist() == [0x76543210, signed32(0xFEDCBA98), 0x76543210, signed32(0xFEDCBA98)]
    assert qweight[0, 1].item() == signed32(0x87654321)  # column 1 holds 1..8 in its first word
    zero = torch.arange(1, 9)  # [out], zeros 1..8 -> stored 0..7 (v1: zero - 1)
    qzeros = torch.tensor([[0x76543210]], dtype=torch.int32)  # [1 group, 8 // 8]
    scales = (0.5 * torch.arange(1, 9)).to(torch.float16)[None]  # [1, out]
    g_idx = torch.zeros(32, dtype=torch.int32)
    w = dequantize(qweight, qzeros, scales, g_idx, bits=4)
    expected = [[(q[i, o].item() - zero[o].item()) * 0.5 * (o + 1) for i in range(32)] for o in range(8)]
    assert w.tolist() == expected


@pytest.mark.parametrize("bits,word", [(4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_zero_words(bits, word):
    """sym zero is (maxq + 1) / 2, stored minus one: the value vLLM's v1/v2 auto-detection looks for."""
    t = quantize_rtn(torch.randn(32, 64), bits=bits, group_size=32, sym=True)
    assert (t["qzeros"] == word).all()


def check_rtn_bound(weight: torch.Tensor, t: dict, bits: int) -> None:
    w = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    scale = t["scales"].float()[t["g_idx"].long()].t()  # [out, in]
    assert (w - weight).abs().le(scale / 2 * (1 + 1e-3) + 1e-7).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f,group_size", [(256, 32), (256, 128), (96, 64), (160, -1)])
def test_rtn_error_bound(bits, sym, in_f, group_size):
    weight = torch.randn(48, in_f, generator=torch.Generator().manual_seed(in_f)) * 0.05
    t = quantize_rtn(weight, bits, group_size, sym)
    num_groups = 1 if group_size == -1 else -(-in_f // group_size)
    assert t["qweight"].shape == (in_f * bits // 32, 48) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (num_groups, 48 * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (num_groups, 48) and t["scales"].dtype == torch.float16
    assert t["g_idx"].tolist() == [i // (in_f if group_size == -1 else group_size) for i in range(in_f)]
    check_rtn_bound(weight, t, bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_asym_edge_groups_stay_storable(bits):
    """All-positive (zero would be 0), all-negative and all-zero groups: zeros stay in [1, maxq]."""
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    weight[:, :32] = weight[:, :32].abs() + 0.1
    weight[:, 32:64] = -weight[:, 32:64].abs()
    weight[:8, 64:] = 0
    t = quantize_rtn(weight, bits, 32, sym=False)
    stored = unpack_int(t["qzeros"], bits, dim=1)
    assert stored.min() >= 0 and stored.max() <= 2**bits - 2
    check_rtn_bound(weight, t, bits)


@pytest.mark.parametrize("sym", [True, False])
def test_desc_act_grouping(sym):
    weight = torch.randn(32, 200, generator=torch.Generator().manual_seed(1))
    weight[:, 17] *= 10  # the most important channel must land in group 0
    t = quantize_rtn(weight, 4, 64, sym, desc_act=True)
    g = t["g_idx"].long()
    assert g[17] == 0 and g.tolist() != [i // 64 for i in range(200)]
    assert torch.bincount(g).tolist() == [64, 64, 64, 8]
    norms = weight.norm(dim=0)
    for k in range(3):  # groups follow importance: each group's weakest beats the next group's strongest
        assert norms[g == k].min() >= norms[g == k + 1].max()
    check_rtn_bound(weight, t, 4)
    importance = torch.arange(200.0)  # explicit importance: the last channels first
    g2 = quantize_rtn(weight, 4, 64, sym, desc_act=True, importance=importance)["g_idx"]
    assert g2[199] == 0 and g2[0] == 3


def make_gptq_linear(in_f: int, out_f: int, bias: bool, seed: int = 0, **kw) -> tuple[nn.Linear, GPTQLinear]:
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    return linear, GPTQLinear.from_linear(linear, **kw)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("in_f,out_f,bias,kw", [(256, 64, False, {}), (96, 40, True, {"group_size": 32}),
                                                 (128, 24, True, {"bits": 8, "desc_act": True, "sym": False})])
def test_gptq_linear_matches_dequantized_f_linear(dtype, atol, in_f, out_f, bias, kw):
    linear, qlinear = make_gptq_linear(in_f, out_f, bias, **kw)
    assert not list(qlinear.parameters())
    x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
    y = qlinear(x)
    assert y.shape == (3, 5, out_f) and y.dtype == dtype
    w = qlinear.dequantized_weight(dtype)
    ref = F.linear(x, w, None if qlinear.bias is None else qlinear.bias.to(dtype))
    torch.testing.assert_close(y, ref, atol=atol, rtol=0)
    y.float().square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, w, None if qlinear.bias is None else qlinear.bias.to(dtype)).float().square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=atol * 10, rtol=1e-2)
    assert all(not b.requires_grad and b.grad is None for b in qlinear.buffers())
    close = F.linear(x.detach().float(), linear.weight.detach(), linear.bias)  # RTN stays near the original
    assert (y.detach().float() - close).abs().mean() < 0.1 * close.abs().mean()


def test_from_tensors_names_and_bytes():
    linear, qlinear = make_gptq_linear(256, 64, True)
    names = gptq_param_names("model.layers.0.mlp.up_proj", bias=True)
    assert names == [f"model.layers.0.mlp.up_proj.{n}" for n in ("qweight", "qzeros", "scales", "g_idx", "bias")]
    assert sorted(qlinear.state_dict()) == sorted(n.rsplit(".", 1)[1] for n in names)
    tensors = {k: v for k, v in qlinear.state_dict().items() if k != "bias"}
    rebuilt = GPTQLinear.from_tensors(tensors, bits=4, group_size=128, bias=qlinear.bias)
    no_g_idx = GPTQLinear.from_tensors({k: v for k, v in tensors.items() if k != "g_idx"}, bits=4, group_size=128)
    assert torch.equal(rebuilt.dequantized_weight(), qlinear.dequantized_weight())
    assert torch.equal(no_g_idx.dequantized_weight(), qlinear.dequantized_weight())
    assert (rebuilt.in_features, rebuilt.out_features) == (256, 64)
    assert qlinear.weight_bytes == 32 * 64 * 4 + 2 * 8 * 4 + 2 * 64 * 2 + 256 * 4
    with pytest.raises(ValueError, match="scales"):
        GPTQLinear.from_tensors({**tensors, "scales": tensors["scales"][:, :32]}, bits=4, group_size=128)


def test_export_gptq(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                      tie_word_embeddings=False)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    src, out = tmp_path / "src", tmp_path / "gptq"
    hf_model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    messages: list[str] = []
    assert export_gptq(src, out, group_size=32, progress=messages.append) == out
    assert len(messages) == 2 and messages[0].startswith("layer 1/2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                          "sym": True, "lm_head": False, "checkpoint_format": "gptq"}
    assert cfg["hidden_size"] == 64
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer_config.json").is_file()
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    original = hf_model.state_dict()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert not [n for n in tensors if n.endswith("_proj.weight")]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                 "model.layers.1.input_layernorm.weight"):
        assert torch.equal(tensors[name], original[name])
    for name, weight in original.items():
        if not name.endswith("_proj.weight"):
            continue
        prefix = name.removesuffix(".weight")
        out_f, in_f = weight.shape
        bias = f"{prefix}.bias" in original
        t = {n.rsplit(".", 1)[1]: tensors[n] for n in gptq_param_names(prefix, bias)}
        assert t["qweight"].shape == (in_f // 8, out_f) and t["qweight"].dtype == torch.int32
        assert t["qzeros"].shape == (in_f // 32, out_f // 8) and t["qzeros"].dtype == torch.int32
        assert t["scales"].shape == (in_f // 32, out_f) and t["scales"].dtype == torch.float16
        assert t["g_idx"].shape == (in_f,) and t["g_idx"].dtype == torch.int32
        if bias:
            assert t["bias"].dtype == torch.float16
            torch.testing.assert_close(t["bias"].float(), original[f"{prefix}.bias"], atol=1e-3, rtol=1e-3)
        check_rtn_bound(weight, t, 4)


def test_export_gptq_with_a_quantized_head(tmp_path, default_model_dir):
    """lm_head=True: a head tied to the embedding is written as its own quantized lm_head (the embedding stays dense)
    and the folder loads with a GPTQ head whose logits are close to the dense model's."""
    from loraplex.engine.loader import load_model
    from loraplex.engine.quant.gptq import GPTQLinear
    from tests.adapters.peft_factory import make_tiny_model

    src = make_tiny_model(tmp_path / "tiny", default_model_dir)
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"]
    out = export_gptq(src, tmp_path / "q", bits=8, group_size=64, lm_head=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["quantization_config"]["lm_head"] is True
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in names and {"lm_head.qweight", "lm_head.scales", "lm_head.qzeros"} <= names
    dense, _ = load_model(src, torch.float32)
    quant, _ = load_model(out, torch.float32)
    assert isinstance(quant.lm_head, GPTQLinear) and torch.equal(quant.model.embed_tokens.weight, embedding)
    h = torch.randn(3, 64)
    with torch.inference_mode():
        want, got = dense.lm_head(h), quant.lm_head(h)
    assert (got - want).abs().max() <= 0.02 * want.abs().max()  # 8-bit rounding of the head, nothing else
