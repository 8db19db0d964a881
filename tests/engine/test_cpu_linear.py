"""PackedLinear (oneDNN-prepacked CPU weights) against nn.Linear, and a prepacked model against transformers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.engine.cpu_linear import PackedLinear, can_prepack, prepack_linears

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

    from loraplex.engine.attention import allocate_kv_caches, build_forward_batch
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
