"""`loraplex export`: the merged HF folder gives loraplex-serving's logits in transformers; the merged GGUF
holds exactly the merged weights (read back with the gguf package) and loads in loraplex; the GGUF LoRA's
B·A is the adapter's delta; quantized bases, unknown adapters and foreign architectures are refused."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers

from loraplex.adapters.export import (
    ExportError,
    adapter_deltas,
    export_gguf,
    export_gguf_lora,
    export_hf,
    resolve_adapter_folder,
)
from loraplex.adapters.runtime import LoRARuntime
from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.loader import load_model
from loraplex.engine.weights import iter_safetensors, unpermute_qk
from loraplex.serve.cli import main
from tests.adapters.peft_factory import (
    add_random_adapter,
    make_tiny_model,
    save_adapter,
)
from tests.adapters.test_lora_parity import lora_runner

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [5, 900, 31, 7, 4410, 12, 77, 2048, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_model(root / "base", default_model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft_model = add_random_adapter(hf, "fact", r=8, alpha=16, target_modules=ALL, use_rslora=True, seed=3, std=0.2)
    adapter = save_adapter(peft_model, "fact", root / "peft")
    return base, adapter, root


def serving_logits(base, adapter) -> torch.Tensor:
    model, config = load_model(base, torch.float32)
    runtime = LoRARuntime(model, config, torch.float32, torch.device("cpu"), max_lora_rank=16, num_pages=40,
                          max_cpu_loras=2)
    runtime.register_adapter("fact", 1, 1, str(adapter))
    req = Request("r", IDS, SamplingParams(), adapter_id=1, adapter_version=1)
    runtime.add_request(req)
    assert runtime.admit(req)
    return lora_runner(model, config, runtime, {"r": req}, block_size=16, num_blocks=8).run(
        {"r": IDS}, [[("r", len(IDS))]])["r"]


def hf_logits(folder) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def test_merged_hf_folder_gives_the_served_adapters_logits(tiny, tmp_path):
    base, adapter, _ = tiny
    out = export_hf(base, adapter, tmp_path / "merged", torch.float32)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    served = serving_logits(base, adapter)
    merged = hf_logits(out)
    torch.testing.assert_close(merged, served, atol=1e-4, rtol=0)
    assert (merged - hf_logits(base)).abs().max() > 0.1  # the adapter really changes the model
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.encode("hello") == transformers.AutoTokenizer.from_pretrained(base).encode("hello")


def merged_reference(base, adapter) -> dict[str, torch.Tensor]:
    deltas = adapter_deltas(adapter, base)
    return {name: (t.float() + deltas[name]) if name in deltas else t.float() for name, t in iter_safetensors(base)}


def test_merged_gguf_holds_the_merged_weights_and_loads(tiny, tmp_path):
    base, adapter, _ = tiny
    path = export_gguf(base, adapter, tmp_path / "merged.gguf", "f32")
    reader = gguf.GGUFReader(path)
    want = merged_reference(base, adapter)
    config = json.loads((base / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and len(names) == len(want)  # tied embeddings: no separate output
    for t in reader.tensors:
        data = np.array(t.data).reshape([int(d) for d in reversed(t.shape)])
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if kind in heads:
            data = unpermute_qk(data, heads[kind])
        hf = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}.get(t.name)
        if hf is None:
            layer, rest = t.name.split(".")[1], ".".join(t.name.split(".")[2:])
            hf = next(k for k in want if k.startswith(f"model.layers.{layer}.") and
                      k.endswith({"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "q_proj.weight",
                                  "attn_k.weight": "k_proj.weight", "attn_v.weight": "v_proj.weight",
                                  "attn_output.weight": "o_proj.weight", "ffn_norm.weight":
                                  "post_attention_layernorm.weight", "ffn_gate.weight": "gate_proj.weight",
                                  "ffn_up.weight": "up_proj.weight", "ffn_down.weight": "down_proj.weight"}[rest]))
        np.testing.assert_array_equal(data, want[hf].numpy(), err_msg=t.name)
    fields = {f.name for f in reader.fields.values()}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
            "llama.attention.head_count_kv"} <= fields
    # loraplex itself loads the GGUF (as llama.cpp's converter writes them) and computes the merged logits
    model, model_config = load_model(path, torch.float32)
    merged = export_hf(base, adapter, tmp_path / "hf", torch.float32)
    from tests.engine.test_models import PagedRunner
    ours = PagedRunner(model, model_config, block_size=16, num_blocks=8).run({"r": IDS}, [[("r", len(IDS))]])["r"]
    torch.testing.assert_close(ours, hf_logits(merged), atol=1e-4, rtol=0)
    q8 = export_gguf(base, adapter, tmp_path / "merged-q8.gguf", "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_gguf_lora_holds_the_adapters_delta(tiny, tmp_path):
    base, adapter, _ = tiny
    path = export_gguf_lora(base, adapter, tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    deltas = adapter_deltas(adapter, base)
    config = json.loads((base / "config.json").read_text())
    a, b = tensors["blk.1.attn_k.weight.lora_a"], tensors["blk.1.attn_k.weight.lora_b"]
    r = a.shape[0]
    delta = unpermute_qk(b, config["num_key_value_heads"]) @ a * (alpha / r)
    np.testing.assert_allclose(delta, deltas["model.layers.1.self_attn.k_proj.weight"].numpy(), atol=1e-6)
    a, b = tensors["blk.0.ffn_down.weight.lora_a"], tensors["blk.0.ffn_down.weight.lora_b"]
    np.testing.assert_allclose(b @ a * (alpha / r), deltas["model.layers.0.mlp.down_proj.weight"].numpy(), atol=1e-6)
    assert len(tensors) == 2 * 7 * config["num_hidden_layers"]


def test_refusals(tiny, tmp_path, caplog):
    base, adapter, root = tiny
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((base / "config.json").read_text())
    (gptq / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ExportError, match="GPTQ checkpoint.*float"):
        export_hf(gptq, adapter, tmp_path / "out")
    with pytest.raises(ExportError, match="no adapter 'nope'"):
        resolve_adapter_folder("nope", root, None)
    assert main(["export", "--adapter", "nope", "--adapter-dir", str(root), "--model", str(base), "--merge",
                 "--output", str(tmp_path / "x")]) == 2
    assert "no adapter 'nope'" in caplog.text
    assert not (tmp_path / "x").exists()
    assert main(["export", "--adapter", str(adapter), "--model", str(base), "--merge", "--output",
                 str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()


def test_merged_dora_adapter_gives_peft_and_served_logits(tiny, tmp_path):
    """A DoRA adapter merges as PEFT's merge_and_unload does: (m / ‖W + ΔW‖)·(W + ΔW); the GGUF LoRA format has no
    magnitudes and refuses it; an adapter with its own head is refused."""
    base, _, root = tiny
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft_model = add_random_adapter(hf, "dora", r=8, alpha=16, target_modules=ALL, seed=4, std=0.2, use_dora=True)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.2)
    adapter = save_adapter(peft_model, "dora", root / "peft-dora")
    out = export_hf(base, adapter, tmp_path / "merged", torch.float32)
    merged = hf_logits(out)
    torch.testing.assert_close(merged, serving_logits(base, adapter), atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged, peft_model(torch.tensor([IDS])).logits[0], atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match="DoRA"):
        export_gguf_lora(base, adapter, tmp_path / "dora.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    headed = save_adapter(add_random_adapter(hf, "headed", r=4, alpha=8, target_modules=["q_proj"], seed=5,
                                             modules_to_save=["lm_head"]), "headed", root / "peft-headed")
    with pytest.raises(ExportError, match="lm_head"):
        export_hf(base, headed, tmp_path / "headed")
