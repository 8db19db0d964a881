"""Reading PEFT folders: what we accept is computed as PEFT would; what we don't serve is refused
with a clear 4xx error before anything is registered."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import AdapterError, UnsupportedAdapterError
from loraplex.adapters.peft import load_adapter, parse_adapter_config
from loraplex.engine.core.config import ModelConfig
from tests.adapters.peft_factory import write_random_peft

CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=16, intermediate_size=24,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                     max_position_embeddings=64)


@pytest.fixture
def folder(tmp_path):
    return write_random_peft(tmp_path / "a", CONFIG, r=4, alpha=8, target_modules=("q_proj", "down_proj"))


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_scale_is_folded_into_b(folder):
    w = load_adapter(folder, CONFIG, 64)
    raw = load_file(str(folder / "adapter_model.safetensors"))
    a, b = w.tensors[1, "down_proj"]
    key = "base_model.model.model.layers.1.mlp.down_proj"
    assert torch.equal(a, raw[f"{key}.lora_A.weight"])
    torch.testing.assert_close(b, raw[f"{key}.lora_B.weight"] * 2.0)  # alpha / r = 8 / 4
    assert w.rank == 4 and w.target_modules == ("q_proj", "down_proj")
    edit_config(folder, use_rslora=True)
    torch.testing.assert_close(load_adapter(folder, CONFIG, 64).tensors[1, "down_proj"][1],
                               raw[f"{key}.lora_B.weight"] * 4.0)  # alpha / sqrt(r)


@pytest.mark.parametrize("field,value", [("modules_to_save", ["model.norm"]), ("bias", "all"),
                                         ("lora_bias", True), ("peft_type", "IA3"), ("layer_replication", [[0, 1]])])
def test_unsupported_features_are_422(folder, field, value):
    edit_config(folder, **{field: value})
    with pytest.raises(UnsupportedAdapterError) as e:
        load_adapter(folder, CONFIG, 64)
    assert e.value.status_code == 422 and (field in e.value.message or "IA3" in e.value.message)


def test_rank_above_the_server_limit_is_refused(folder):
    with pytest.raises(UnsupportedAdapterError, match="max-lora-rank"):
        load_adapter(folder, CONFIG, 2)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                             torch.zeros(4, 17)), "do not fit"),
    (lambda t: t.__setitem__("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight",
                             torch.zeros(4, 16)), "does not have"),
    (lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"), "partner"),
    (lambda t: t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(math.inf), "NaN or Inf"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(4, 16),
                         "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(8, 4)}),
     "target_modules does not select"),
    (lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 16)), "does not select it"),
    (lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(4, 16)), "modules_to_save does not list"),
    (lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                             torch.zeros(16)), "DoRA"),
    (lambda t: t.clear() or t.__setitem__("x", torch.zeros(1)), "not served"),
])
def test_weights_that_do_not_fit_are_refused(folder, change, match):
    edit_tensors(folder, change)
    with pytest.raises(AdapterError, match=match):
        load_adapter(folder, CONFIG, 64)


def test_config_validation(folder):
    with pytest.raises(AdapterError, match="target_modules"):
        parse_adapter_config({"r": 4, "target_modules": []}, 64)
    with pytest.raises(AdapterError, match="positive"):
        parse_adapter_config({"r": 0, "target_modules": ["q_proj"]}, 64)
    with pytest.raises(AdapterError, match="match no linear"):
        edit_config(folder, target_modules=["qq_proj"])
        load_adapter(folder, CONFIG, 64)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(folder, CONFIG, 64)


def test_regex_targets_layers_to_transform_and_fan_in_fan_out(folder):
    edit_config(folder, target_modules=r".*\.(q_proj|down_proj)", fan_in_fan_out=True)
    assert load_adapter(folder, CONFIG, 64).rank == 4  # fan_in_fan_out is moot on nn.Linear, as in PEFT
    edit_config(folder, layers_to_transform=[0])
    with pytest.raises(AdapterError, match="does not select"):  # layer 1 has weights but is not targeted
        load_adapter(folder, CONFIG, 64)


def test_legacy_bin_only_as_plain_tensors(folder, tmp_path):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    assert load_adapter(folder, CONFIG, 64).rank == 4
    with pytest.raises(AdapterError, match="not accepted"):
        load_adapter(folder, CONFIG, 64, allow_bin=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="plain tensors"):
        load_adapter(folder, CONFIG, 64)
