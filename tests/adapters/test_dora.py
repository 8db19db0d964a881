"""DoRA adapters (PEFT use_dora) served from the pool: logits parity with peft for ranks 4-32, attention-only and
all-linear, on a Llama and on a Qwen2 with q/k/v biases, in one mixed batch with plain LoRA and base rows; greedy
alone equals greedy in a busy batch; malformed DoRA files refused with nothing registered."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import AdapterError
from loraplex.adapters.peft import load_adapter
from loraplex.adapters.runtime import LoRARuntime
from loraplex.engine.loader import load_model
from tests.adapters.peft_factory import add_random_adapter, save_adapter
from tests.adapters.test_lora_parity import lora_runner, peft_logits, run_mixed_batch
from tests.engine.test_models import TINY_CONFIGS, randomize

ATOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (adapter_id, r, alpha, target_modules, use_dora)
    "dora4-attn": (1, 4, 8, ["q_proj", "v_proj"], True),
    "dora8-all": (2, 8, 16, ALL, True),
    "dora32-all": (3, 32, 16, ALL, True),
    "dora16-mlp": (4, 16, 32, ["gate_proj", "up_proj", "down_proj"], True),
    "lora8-all": (5, 8, 16, ALL, False),
}


def build(family, tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "base")
    peft_model, folders = hf, {}
    for seed, (name, (_, r, alpha, targets, dora)) in enumerate(ADAPTERS.items()):
        peft_model = add_random_adapter(peft_model, name, r=r, alpha=alpha, target_modules=targets, seed=seed,
                                        std=0.2, use_dora=dora)
        gen = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():  # magnitudes away from PEFT's init (the base norm), as training leaves them
            for param_name, p in peft_model.named_parameters():
                if f"lora_magnitude_vector.{name}" in param_name:
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        folders[name] = save_adapter(peft_model, name, tmp_path / "peft")
    model, config = load_model(tmp_path / "base", torch.float32)
    runtime = LoRARuntime(model, config, torch.float32, torch.device("cpu"), max_lora_rank=32, num_pages=200,
                          max_cpu_loras=8)
    for name, (adapter_id, *_) in ADAPTERS.items():
        info = runtime.register_adapter(name, adapter_id, 1, str(folders[name]))
        assert info["kind"] == ("dora" if ADAPTERS[name][4] else "lora")
    return peft_model, model, config, runtime, folders


@pytest.fixture(scope="module", params=["llama_gqa", "qwen2_qkv_bias"])
def dora_setup(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(f"dora_{request.param}"))


def test_dora_rows_match_peft_in_a_mixed_batch(dora_setup):
    peft_model, model, config, runtime, _ = dora_setup
    which = {"base": None, **{f"r-{n}": n for n in ADAPTERS}, "again": "dora8-all"}
    ours, seqs, requests = run_mixed_batch(model, config, runtime, which, ADAPTERS, seed=1, first=0)
    for name, logits in ours.items():
        ref = peft_logits(peft_model, which[name], seqs[name][:logits.shape[0]])
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    # DoRA's normalisation really acts: the same A and B served as plain LoRA would be far off
    runtime._dora_step = lambda segments: {}
    try:
        again = lora_runner(model, config, runtime, requests, block_size=4, num_blocks=96).run(
            {"r-dora8-all": seqs["r-dora8-all"]}, [[("r-dora8-all", len(seqs["r-dora8-all"]))]])
    finally:
        del runtime._dora_step
    ref = peft_logits(peft_model, "dora8-all", seqs["r-dora8-all"])
    assert (again["r-dora8-all"] - ref).abs().max() > 0.01
    for request in requests.values():
        runtime.release(request, finished=True)
    assert all(runtime.pool.pin_count(k) == 0 for k in runtime.pool.resident)
    # one scale page beside the rank-rows
    assert runtime.pool.num_used_pages == sum(r + dora for _, r, _, _, dora in ADAPTERS.values())


def test_malformed_dora_adapters_are_refused(dora_setup, tmp_path):
    *_, config, runtime, folders = dora_setup
    src = folders["dora8-all"]
    state = load_file(str(src / "adapter_model.safetensors"))
    mag = next(k for k in state if "lora_magnitude_vector" in k)
    raw = json.loads((src / "adapter_config.json").read_text())
    cases = {
        "shape": ({**state, mag: state[mag][:-1]}, raw, "lora_magnitude_vector is"),
        "missing": ({k: v for k, v in state.items() if k != mag}, raw, "lora_magnitude_vector is missing"),
        "nan": ({**state, mag: torch.full_like(state[mag], float("nan"))}, raw, "NaN"),
        "without-use_dora": (state, {**raw, "use_dora": False}, "without use_dora"),
    }
    before = set(runtime.registry)
    for i, (what, (tensors, cfg, message)) in enumerate(cases.items()):
        folder = tmp_path / what
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(AdapterError, match=message):
            load_adapter(folder, config, 32)
        with pytest.raises(AdapterError, match=message):
            runtime.register_adapter(what, 50 + i, 1, str(folder))
    assert set(runtime.registry) == before


def test_dora_greedy_alone_equals_busy_batch(tmp_path, default_model_dir):
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import make_tiny_model, write_random_peft
    from tests.adapters.test_lora_engine import GREEDY, lora_engine, prompt, run
    tiny_dir = make_tiny_model(tmp_path / "tiny", default_model_dir)
    config = _read_model_config(str(tiny_dir))
    engine = lora_engine(tiny_dir)
    hook = engine.adapter_hook
    for i, (targets, dora) in enumerate([(ALL, True), (("q_proj", "v_proj"), True), (ALL, False)]):
        folder = write_random_peft(tmp_path / f"d{i}", config, r=8, seed=60 + i, std=0.3, target_modules=targets,
                                   use_dora=dora)
        hook.register_adapter(f"d{i}", i + 1, 1, str(folder))
    keys = [None, (1, 1), (2, 1), (3, 1)]
    alone = {f"{k}-{j}": run(engine, {"x": (prompt(j), GREEDY, k)})["x"] for k in keys for j in range(3)}
    assert len({tuple(v) for v in alone.values()}) > 8
    mixed = run(engine, {f"{k}-{j}": (prompt(j), GREEDY, k) for j in range(3) for k in keys})
    assert mixed == alone
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks and not hook._pinned
    assert all(hook.pool.pin_count(k) == 0 for k in hook.pool.resident)


@pytest.mark.parametrize("bias", [False, True])
def test_dense_weight_of_prepacked_siblings_is_exact(bias):
    """DoRA's norms read the base weight back from whatever serves it: a oneDNN-prepacked q/k/v group included."""
    from loraplex.adapters.dora import dense_weight
    from loraplex.engine.kernels.cpu_linear import PackedGroup, PackedLinear
    torch.manual_seed(0)
    linears = [torch.nn.Linear(48, n, bias=bias) for n in (32, 16, 16)]
    group = PackedGroup(linears, batch_size_hint=8)
    packed = [PackedLinear(m, 8, group=group, index=i) for i, m in enumerate(linears)]
    for m, p in zip(linears, packed):
        assert torch.equal(dense_weight(p, torch.float32, torch.device("cpu")), m.weight.detach())
    x = torch.randn(3, 48)
    with torch.inference_mode():  # the group still serves the siblings of one input after a probe
        outs = [p(x) for p in packed]
    for m, out in zip(linears, outs):
        torch.testing.assert_close(out, m(x).detach(), atol=1e-5, rtol=1e-5)
