"""MixLoRA adapters in MoE-PEFT's format (adapters/mixlora.py): read and written (safetensors, and their .bin only
through the restricted unpickler), the legacy layout converted, hostile or wrong files refused with a message,
and the float64 reference of the block and its aux loss against facts that follow from the formula."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loraplex.adapters.errors import AdapterError, UnsupportedAdapterError
from loraplex.adapters.mixlora import (
    aux_loss_reference,
    ffn_reference,
    is_mixlora_config,
    load_mixlora,
    parse_mixlora_config,
    route,
)
from loraplex.adapters.synthetic import write_random_mixlora
from loraplex.engine.core.config import ModelConfig

CONFIG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=128)


def _raw(folder):
    return json.loads((folder / "adapter_config.json").read_text())


def test_round_trip_scales_and_config(tmp_path):
    folder = write_random_mixlora(tmp_path / "a", CONFIG, r=4, alpha=8, num_experts=4, top_k=2, write_bin=True,
                                  extra_config={"use_rslora": True, "expert_lora": {"r": 2, "lora_alpha": 6}})
    raw = _raw(folder)
    assert raw["peft_type"] == "MIXLORA" and raw["lora_alpha"] == 8 and isinstance(raw["lora_alpha"], int)
    assert raw["expert_lora"] == {"r": 2, "lora_alpha": 6, "lora_dropout": 0.05} and raw["top_k"] == 2
    w = load_mixlora(folder, CONFIG, max_lora_rank=64)
    assert set(w.router) == {0, 1} and w.router[0].shape == (4, 32)
    a, b = w.experts[1, "down_proj"]
    assert a.shape == (4, 2, 48) and b.shape == (4, 32, 2)  # expert rank from expert_lora
    from safetensors.torch import load_file
    raw_b = load_file(str(folder / "adapter_model.safetensors"))["mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight"]
    torch.testing.assert_close(b[3], raw_b * 6 / math.sqrt(2))  # rsLoRA scale of the experts folded in
    qa, qb = w.attention[0, "q_proj"]
    assert qa.shape == (4, 32) and qb.shape == (32, 4)
    # MoE-PEFT's own file: the .bin alone reads the same (restricted unpickler)
    (folder / "adapter_model.safetensors").unlink()
    again = load_mixlora(folder, CONFIG, max_lora_rank=64)
    torch.testing.assert_close(again.experts[1, "down_proj"][1], b)
    with pytest.raises(AdapterError, match="pickle"):
        load_mixlora(folder, CONFIG, max_lora_rank=64, allow_bin=False)


def test_the_legacy_layout_converts(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = write_random_mixlora(tmp_path / "new", CONFIG, num_experts=2, top_k=1,
                                  target_modules=("q_proj", "gate_proj", "up_proj", "down_proj"))
    current = load_mixlora(folder, CONFIG, max_lora_rank=64)
    legacy_names = {"gate_proj": "w1_proj", "down_proj": "w2_proj", "up_proj": "w3_proj"}
    state = {}
    for key, t in load_file(str(folder / "adapter_model.safetensors")).items():
        parts = key.split(".")
        if parts[3] == "mlp" and parts[4] == "moe_gate":
            key = f"mixlora.layers.{parts[2]}.gate.weight"
        elif parts[3] == "mlp":
            key = f"mixlora.layers.{parts[2]}.experts.{parts[6]}.{legacy_names[parts[4]]}.lora_{parts[7][-1]}.weight"
        state[key] = t
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, str(old / "adapter_model.safetensors"))
    raw = {**_raw(folder), "routing_strategy": "mixtral", "target_modules": ["q_proj", "w1_proj", "w2_proj", "w3_proj"]}
    del raw["peft_type"]
    (old / "adapter_config.json").write_text(json.dumps(raw))
    assert is_mixlora_config(raw)
    converted = load_mixlora(old, CONFIG, max_lora_rank=64)
    assert converted.config.routing_strategy == "mixlora"
    for key, (a, b) in current.experts.items():
        torch.testing.assert_close(converted.experts[key][0], a)
        torch.testing.assert_close(converted.experts[key][1], b)
    torch.testing.assert_close(converted.router[1], current.router[1])


def _break(folder, mutate):
    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / "adapter_model.safetensors"))
    mutate(state)
    save_file(state, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", ["missing expert", "extra expert", "wrong shape", "router for a missing layer",
                                  "router missing", "nan", "partner missing", "not a target", "unknown tensor"])
def test_wrong_files_are_refused(tmp_path, case):
    folder = write_random_mixlora(tmp_path / "a", CONFIG, num_experts=3, top_k=2)
    key = "mixlora.layers.0.mlp.up_proj.experts.{e}.lora_A.weight"
    mutate = {
        "missing expert": lambda s: (s.pop(key.format(e=2)), s.pop(key.format(e=2).replace("lora_A", "lora_B"))),
        "extra expert": lambda s: s.update({key.format(e=3): s[key.format(e=0)].clone()}),
        "wrong shape": lambda s: s.update({key.format(e=1): torch.zeros(8, 31)}),
        "router for a missing layer": lambda s: s.update({"mixlora.layers.7.mlp.moe_gate.weight": torch.zeros(3, 32)}),
        "router missing": lambda s: s.pop("mixlora.layers.1.mlp.moe_gate.weight"),
        "nan": lambda s: s[key.format(e=0)].__setitem__((0, 0), float("nan")),
        "partner missing": lambda s: s.pop("mixlora.layers.1.self_attn.q_proj.lora_B.weight"),
        "not a target": lambda s: s.update({"mixlora.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(8, 32)}),
        "unknown tensor": lambda s: s.update({"mixlora.layers.0.mlp.bias": torch.zeros(3)}),
    }[case]
    _break(folder, mutate)
    with pytest.raises(AdapterError):
        load_mixlora(folder, CONFIG, max_lora_rank=64)


@pytest.mark.parametrize("raw, error", [
    ({"routing_strategy": "mixlora-switch"}, UnsupportedAdapterError),
    ({"top_k": 5}, AdapterError),  # more than num_experts
    ({"num_experts": 0}, AdapterError),
    ({"use_dora": True}, UnsupportedAdapterError),
    ({"target_modules": ["q_proj"]}, AdapterError),  # no experts
    ({"target_modules": ["lm_head", "up_proj"]}, AdapterError),
    ({"act_fn": "tanh"}, AdapterError),
    ({"r": 1000}, AdapterError),
    ({"routing_strategy": "rotating"}, AdapterError),
])
def test_bad_configs_are_refused(raw, error):
    base = {"peft_type": "MIXLORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "up_proj"],
            "routing_strategy": "mixlora", "num_experts": 4, "top_k": 2, "act_fn": "silu"}
    with pytest.raises(error):
        parse_mixlora_config({**base, **raw}, max_lora_rank=64)


def _base_ffn(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.2 for shape in ((48, 32), (48, 32), (32, 48))]


def test_reference_with_zero_experts_is_the_dense_ffn(tmp_path):
    """B = 0 (a freshly initialised MixLoRA): every expert is the base FFN, and the mixture's weights sum to 1
    (top-k renormalises), so the block is the dense FFN exactly."""
    folder = write_random_mixlora(tmp_path / "a", CONFIG, num_experts=4, top_k=2)
    w = load_mixlora(folder, CONFIG, max_lora_rank=64)
    w.experts = {k: (a, torch.zeros_like(b)) for k, (a, b) in w.experts.items()}
    wg, wu, wd = _base_ffn()
    x = torch.randn(9, 32, dtype=torch.float64)
    y, logits = ffn_reference(w, 0, x, wg, wu, wd)
    dense = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    torch.testing.assert_close(y, dense, rtol=1e-12, atol=1e-12)
    assert logits.shape == (9, 4)


def test_reference_top_k_equals_a_hand_computed_mixture(tmp_path):
    folder = write_random_mixlora(tmp_path / "a", CONFIG, num_experts=4, top_k=2, std=0.3)
    w = load_mixlora(folder, CONFIG, max_lora_rank=64, dtype=torch.float64)
    wg, wu, wd = _base_ffn(1)
    x = torch.randn(5, 32, dtype=torch.float64)
    y, logits = ffn_reference(w, 1, x, wg, wu, wd)
    for t in range(5):
        p = torch.softmax(logits[t], -1)
        top = torch.topk(p, 2)
        want = torch.zeros(32, dtype=torch.float64)
        for pe, e in zip(top.values / top.values.sum(), top.indices):
            (ga, gb), (ua, ub), (da, db) = (w.experts[1, m] for m in ("gate_proj", "up_proj", "down_proj"))
            h = torch.nn.functional.silu(wg @ x[t] + gb[e] @ (ga[e] @ x[t])) * (wu @ x[t] + ub[e] @ (ua[e] @ x[t]))
            want += pe * (wd @ h + db[e] @ (da[e] @ h))
        torch.testing.assert_close(y[t], want, rtol=1e-10, atol=1e-10)


def test_dynamic_routing_keeps_the_smallest_prefix_reaching_top_p():
    config = parse_mixlora_config({"peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"],
                                   "routing_strategy": "mixlora-dynamic", "num_experts": 4, "top_p": 0.7,
                                   "act_fn": "silu"}, max_lora_rank=64)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]], dtype=torch.float64)
    gates = route(config, p.log())
    torch.testing.assert_close(gates, torch.tensor([[0.5, 0.3, 0, 0], [0.9, 0, 0, 0]], dtype=torch.float64))


def test_aux_loss_is_coef_times_k_when_balanced():
    config = parse_mixlora_config({"peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"],
                                   "routing_strategy": "mixlora", "num_experts": 4, "top_k": 2, "act_fn": "silu"},
                                  max_lora_rank=64)
    logits = torch.zeros(8, 4, dtype=torch.float64)  # uniform probabilities; ties: pick a balanced choice
    logits[torch.arange(8), torch.arange(8) % 4] = 1e-9
    logits[torch.arange(8), (torch.arange(8) + 1) % 4] = 1e-9
    torch.testing.assert_close(aux_loss_reference(config, logits, 0.01), torch.tensor(0.02, dtype=torch.float64))
    logits.requires_grad_(True)
    aux_loss_reference(config, logits * 3, 0.01).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("rslora", [False, True])
def test_reference_block_matches_the_mixlora_package(tmp_path, rslora):
    """Our float64 reference of the block against the `mixlora` package's MixLoraSparseMoe (its own loader and
    injection into a tiny transformers Llama, LoRA dropout switched off by hand: the package leaves it on)."""
    pytest.importorskip("mixlora")
    import transformers
    from mixlora.model import inject_adapter_in_model, load_adapter_weights
    folder = write_random_mixlora(tmp_path / "a", CONFIG, r=4, alpha=8, num_experts=4, top_k=2, std=0.3,
                                  write_bin=True, target_modules=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"),
                                  extra_config={"use_rslora": rslora})
    raw = _raw(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**raw, "base_model_name_or_path": "unused"}))
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8)).double().eval()
    config, weights = load_adapter_weights(str(folder), device="cpu", dtype=torch.float64)
    inject_adapter_in_model(hf, config, weights)
    ours = load_mixlora(folder, CONFIG, max_lora_rank=64, dtype=torch.float64)
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    for layer, decoder in enumerate(hf.model.layers):
        moe = decoder.mlp.mixlora_moes["default"]
        for lora in moe.experts_.values():
            lora.eval()
        got = decoder.mlp(x.clone())
        got = got[0] if isinstance(got, tuple) else got
        mlp = decoder.mlp
        want, _ = ffn_reference(ours, layer, x[0], mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        torch.testing.assert_close(got.reshape(7, 32), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 2.0])
def test_dynamic_routing_is_moe_peft_top_p(temperature):
    """`route` for mixlora-dynamic against MoE-PEFT's rule as its _dynamic_top_p states it: sort the (temperature-
    divided) probabilities, drop every expert whose running sum passes top_p except the first one to pass it;
    with T = 2 the sum never reaches top_p and every expert stays."""
    config = parse_mixlora_config({"peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"],
                                   "routing_strategy": "mixlora-dynamic", "num_experts": 6, "act_fn": "silu",
                                   "top_p": 0.55, "temperature": temperature}, max_lora_rank=64)
    logits = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    q = torch.softmax(logits, dim=-1)
    q = q / temperature if temperature > 0 else q
    sorted_q, order = torch.sort(q, dim=-1, descending=True)
    past = sorted_q.cumsum(-1) > 0.55
    first_past = torch.nn.functional.one_hot(past.long().argmax(-1), 6).bool()
    dropped = past & ~first_past
    want = torch.zeros_like(q).scatter(-1, order, sorted_q.masked_fill(dropped, 0.0))
    torch.testing.assert_close(route(config, logits), want, rtol=0, atol=0)
    if temperature == 2.0:
        assert (want > 0).all()
