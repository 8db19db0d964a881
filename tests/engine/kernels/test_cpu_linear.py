"""PackedLinear (oneDNN-prepacked CPU weights) against nn.Linear, and a prepacked model against transformers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from loraplex.engine.kernels.cpu_linear import (BATCH_INVARIANT_ISA, ONEDNN_ISA_VARIABLE, PackedLinear, can_prepack,
                                                has_amx, prepack_linears)

pytestmark = pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("in_f,out_f,bias", [(576, 1536, False), (37, 101, True), (64, 3, True)])
@pytest.mark.parametrize("rows", [1, 5, 64, 130])
def test_packed_linear_matches_linear(dtype, atol, in_f, out_f, bias, rows):
    if not can_prepack(torch.device("cpu"), dtype):
        pytest.skip(f"no oneDNN {dtype} on this CPU")
    torch.manual_seed(rows)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    packed = PackedLinear(lin, batch_size_hint=64)
    x = torch.randn(rows, in_f, dtype=dtype)
    with torch.inference_mode():
        ref, got = lin(x), packed(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert (got.float() - ref.float()).abs().max().item() <= atol * max(1.0, ref.float().abs().max().item())


def test_prepacked_model_logits_match_transformers(tmp_path):
    import transformers

    from loraplex.engine.layers.attention import allocate_kv_caches, build_forward_batch
    from loraplex.engine.loader import load_model
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    model, config = load_model(str(tmp_path), dtype=torch.float32)
    assert prepack_linears(model, batch_size_hint=8) == 2 * 7 + 1
    assert not any(type(m) is nn.Linear for m in model.modules())
    ids = list(range(3, 30))
    caches = allocate_kv_caches(2, 64, 2, 16, torch.float32)
    batch = build_forward_batch(ids, [len(ids)], [0], [[0, 1]], 16, logits_indices=range(len(ids)))
    with torch.inference_mode():
        ours = model.compute_logits(model(batch, caches))
        ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_siblings_match_separate_linears(dtype):
    """q/k/v packed as one weight: each sibling still returns its own product (with its bias), once per
    input; a sibling called twice with one input gets a fresh product, not the slice it may have changed."""
    if not can_prepack(torch.device("cpu"), dtype):
        pytest.skip(f"no oneDNN {dtype} on this CPU")
    torch.manual_seed(0)
    attn = nn.Module()
    attn.q_proj, attn.k_proj, attn.v_proj = (nn.Linear(48, 48, bias=True), nn.Linear(48, 16, bias=False),
                                             nn.Linear(48, 16, bias=True))
    attn.o_proj = nn.Linear(48, 48)
    attn.to(dtype)
    ref = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert prepack_linears(attn, batch_size_hint=8) == 4
    assert attn.q_proj.group is attn.v_proj.group is not None and attn.o_proj.group is None
    x = torch.randn(5, 48, dtype=dtype)
    with torch.inference_mode():
        outs = {n: getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
        for n, y in outs.items():
            torch.testing.assert_close(y, ref[n](x), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
        outs["q_proj"].add_(1.0)  # a LoRA delta added in place to q's slice
        torch.testing.assert_close(attn.q_proj(x), ref["q_proj"](x), atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=1e-2)
    siblings = attn.q_proj.group.siblings
    assert siblings._x is None or siblings._taken.count(True) < 3


def test_fused_siblings_still_backpropagate_with_dense_weights():
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
    ref = nn.Linear(16, 32, bias=False)
    ref.load_state_dict(mlp.gate_proj.state_dict())
    prepack_linears(mlp, batch_size_hint=4, keep_dense=True)
    assert mlp.gate_proj.group is not None
    x = torch.randn(3, 16, requires_grad=True)
    mlp.gate_proj(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_result_in_any_batch(dtype):
    """Batch invariance of the packed linears: a row alone (M = 1) equals that row among others, bit
    for bit, for single and fused (PackedGroup) linears."""
    if not can_prepack(torch.device("cpu"), dtype):
        pytest.skip(f"no oneDNN {dtype} on this CPU")
    torch.manual_seed(1)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(576, 1536, False), nn.Linear(576, 1536, False), \
        nn.Linear(1536, 576, False)
    mlp.to(dtype)
    prepack_linears(mlp, batch_size_hint=64)
    x, h = torch.randn(37, 576, dtype=dtype), torch.randn(37, 1536, dtype=dtype)
    with torch.inference_mode():
        for m, inp in ((mlp.down_proj, h), (mlp.gate_proj, x)):
            many = m(inp).clone()
            for i in range(len(inp)):
                assert torch.equal(m(inp[i:i + 1])[0], many[i]), f"row {i}"


def _fresh_python(code: str, *args: str) -> str:
    """Run `code` in a new interpreter (oneDNN not yet initialised) without conftest's ISA cap; its stdout."""
    environ = {k: v for k, v in os.environ.items() if k != ONEDNN_ISA_VARIABLE}
    result = subprocess.run([sys.executable, "-c", code, *args], env=environ, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(not has_amx(), reason="no AMX on this CPU")
def test_amx_path_matches_linear():
    """--no-batch-invariant keeps oneDNN's AMX kernels: still the same product as nn.Linear (bf16 tolerance)."""
    out = _fresh_python(
        "import torch\n"
        "from torch import nn\n"
        "from loraplex.engine.kernels.cpu_linear import PackedLinear\n"
        "torch.manual_seed(0)\n"
        "for rows in (1, 5, 37, 130):\n"
        "    lin = nn.Linear(576, 1536).to(torch.bfloat16)\n"
        "    x = torch.randn(rows, 576, dtype=torch.bfloat16)\n"
        "    with torch.inference_mode():\n"
        "        got = PackedLinear(lin, 64, pad_single_rows=False)(x)\n"
        "        torch.testing.assert_close(got.float(), lin(x).float(), atol=2e-2, rtol=2e-2)\n"
        "print('ok')\n")
    assert out.strip() == "ok"


@pytest.mark.slow
def test_engine_caps_onednn_for_batch_invariance(default_model_dir):
    """A default (--batch-invariant) bf16 engine in a fresh process: on an AMX CPU it keeps oneDNN off AMX, and its
    packed linears are then batch invariant; --no-batch-invariant leaves oneDNN as it is."""
    if not can_prepack(torch.device("cpu"), torch.bfloat16):
        pytest.skip("no oneDNN torch.bfloat16 on this CPU (the engine runs bf16 unpacked here)")
    code = ("import os, sys\n"
            "from loraplex.engine.engine_args import EngineArgs\n"
            "from loraplex.engine.llm_engine import LLMEngine\n"
            "from loraplex.engine.kernels.cpu_linear import rows_are_batch_invariant\n"
            f"LLMEngine.from_engine_args(EngineArgs(model={str(default_model_dir)!r}, dtype='bfloat16', device='cpu', "
            "max_model_len=64, batch_invariant=sys.argv[1] == 'on'))\n"
            f"print(os.environ.get({ONEDNN_ISA_VARIABLE!r}), rows_are_batch_invariant())\n")

    isa, invariant = _fresh_python(code, "on").split()
    assert invariant == "True"
    assert isa == (BATCH_INVARIANT_ISA if has_amx() else "None")
    assert _fresh_python(code, "off").split()[0] == "None"
