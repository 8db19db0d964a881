"""Adapters with their own embed_tokens / lm_head (PEFT modules_to_save, and LoRA on them): logits parity with peft in
one mixed batch with plain LoRA, DoRA and base rows, on tied and untied embeddings; greedy alone equals greedy in a
busy batch through a pool of fewer module slots than such adapters; pins back to zero; bad files refused."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import AdapterError, UnsupportedAdapterError
from loraplex.adapters.peft import load_adapter
from loraplex.adapters.runtime import LoRARuntime
from loraplex.engine.loader import load_model
from tests.adapters.peft_factory import add_random_adapter, save_adapter
from tests.adapters.test_lora_parity import run_mixed_batch
from tests.engine.test_models import TINY_CONFIGS, randomize

ATOL = 1e-4
ADAPTERS = {  # name: (adapter_id, LoraConfig extras)
    "saved-both": (1, dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "embed_tokens"])),
    "saved-head": (2, dict(target_modules="all-linear", modules_to_save=["lm_head"])),
    "lora-embed-head": (3, dict(target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])),
    "saved-embed-dora": (4, dict(target_modules=["k_proj", "o_proj"], modules_to_save=["embed_tokens"],
                                 use_dora=True)),
    "plain": (5, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
}


def build(tmp_path, tied: bool):
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama_gqa"]()
    config.tie_word_embeddings = tied
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "base")
    references, folders = {None: hf}, {}
    for seed, (name, (_, extra)) in enumerate(ADAPTERS.items()):
        # one peft model per adapter: peft cannot put LoRA on an embedding another adapter saves whole
        fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
        peft_model = references[name] = add_random_adapter(fresh, name, r=4, alpha=8, seed=seed, std=0.2, **extra)
        gen = torch.Generator().manual_seed(50 + seed)
        with torch.no_grad():  # what training leaves: saved modules away from the base, LoRA on the embedding set
            for param_name, p in peft_model.named_parameters():
                if f"modules_to_save.{name}." in param_name:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
                elif f"lora_embedding_A.{name}" in param_name or f"lora_embedding_B.{name}" in param_name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                elif f"lora_magnitude_vector.{name}" in param_name:
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        folders[name] = save_adapter(peft_model, name, tmp_path / "peft")
    model, model_config = load_model(tmp_path / "base", torch.float32)
    return references, model, model_config, folders


def reference_logits(references, name, ids):
    with torch.no_grad():
        return references[name](torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def setup(request, tmp_path_factory):
    peft_model, model, config, folders = build(tmp_path_factory.mktemp("full"), request.param)
    runtime = LoRARuntime(model, config, torch.float32, torch.device("cpu"), max_lora_rank=16, num_pages=64,
                          max_cpu_loras=8, max_full_module_adapters=4)
    for name, (adapter_id, _) in ADAPTERS.items():
        runtime.register_adapter(name, adapter_id, 1, str(folders[name]))
    return peft_model, model, config, runtime, folders


def test_every_kind_matches_peft_in_one_batch(setup):
    peft_model, model, config, runtime, _ = setup
    which = {"base": None, **{f"r-{n}": n for n in ADAPTERS}, "again": "saved-both"}
    ours, seqs, requests = run_mixed_batch(model, config, runtime, which, ADAPTERS, seed=3, first=1)
    for name, logits in ours.items():
        ref = reference_logits(peft_model, which[name], seqs[name][:logits.shape[0]])
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    # the saved head really is another head: the base one gives other logits for the same hidden states
    base = reference_logits(peft_model, None, seqs["r-saved-head"])
    assert (ours["r-saved-head"] - base).abs().max() > 0.1
    for request in requests.values():
        runtime.release(request, finished=True)
    assert not runtime._slot_pinned and all(runtime.module_slots.pin_count(k) == 0 for k in ADAPTERS)
    assert len(runtime.module_slots.resident) == 4  # saved-both, saved-head, lora-embed-head, saved-embed-dora


def test_refused_full_module_files(setup, tmp_path):
    *_, config, runtime, folders = setup
    src = folders["saved-both"]
    state = load_file(str(src / "adapter_model.safetensors"))
    raw = json.loads((src / "adapter_config.json").read_text())
    head = next(k for k in state if k.endswith("lm_head.weight"))
    bigger = torch.cat([state[head], torch.zeros(3, state[head].shape[1])])
    cases = {
        "added-vocab": ({**state, head: bigger}, raw, UnsupportedAdapterError, "beyond the base vocabulary"),
        "norm": (state, {**raw, "modules_to_save": ["lm_head", "embed_tokens", "model.norm"]}, UnsupportedAdapterError,
                 "only the input embedding"),
        "missing": ({k: v for k, v in state.items() if k != head}, raw, AdapterError, "no lm_head.weight"),
        "unlisted": (state, {**raw, "modules_to_save": ["embed_tokens"]}, AdapterError, "does not list lm_head"),
    }
    before = set(runtime.registry)
    for i, (what, (tensors, cfg, error, message)) in enumerate(cases.items()):
        folder = tmp_path / what
        folder.mkdir()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(error, match=message):
            load_adapter(folder, config, 16)
        with pytest.raises(error, match=message):
            runtime.register_adapter(what, 90 + i, 1, str(folder))
    assert set(runtime.registry) == before


def test_greedy_alone_equals_busy_batch_with_few_module_slots(tmp_path, default_model_dir):
    """Three adapters with their own modules share 2 slots beside plain and base rows: the third waits for a slot,
    every output equals the request alone, and slots and pins come back."""
    import shutil

    from tests.adapters.test_lora_engine import GREEDY, lora_engine, prompt, run
    _, _, config, folders = build(tmp_path, tied=True)
    for f in default_model_dir.iterdir():  # a tokenizer for the engine (its first 128 tokens are this model's)
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, tmp_path / "base" / f.name)
    engine = lora_engine(tmp_path / "base", max_full_module_adapters=2, max_lora_rank=8, lora_pool_pages=8 * 8 + 1)
    hook = engine.adapter_hook
    for name, (adapter_id, _) in ADAPTERS.items():
        hook.register_adapter(name, adapter_id, 1, str(folders[name]))
    keys = [None] + [(adapter_id, 1) for adapter_id, _ in ADAPTERS.values()]

    def ids(i):
        return [t % config.vocab_size for t in prompt(i)]
    alone = {f"{k}-{j}": run(engine, {"x": (ids(j), GREEDY, k)})["x"] for k in keys for j in range(2)}
    assert len({tuple(v) for v in alone.values()}) > 8
    mixed = run(engine, {f"{k}-{j}": (ids(j), GREEDY, k) for j in range(2) for k in keys})
    assert mixed == alone
    assert hook.module_slots.num_evictions > 0  # three adapters through two slots
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks and not hook._pinned and not hook._slot_pinned
    assert all(hook.module_slots.pin_count(k) == 0 for k in hook.module_slots.resident)


def test_own_heads_bypass_the_screened_greedy_head(tmp_path, default_model_dir):
    """With the streaming head screened for plain-greedy steps (engine/layers/greedy_head.py), a step with a row of an
    adapter with its own head computes the logits: every adapter's greedy tokens, alone and mixed, as with it off."""
    import shutil

    from tests.adapters.test_lora_engine import GREEDY, lora_engine, prompt, run
    _, _, config, folders = build(tmp_path, tied=True)
    for f in default_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, tmp_path / "base" / f.name)
    keys = [None] + [(adapter_id, 1) for adapter_id, _ in ADAPTERS.values()]

    def ids(i):
        return [t % config.vocab_size for t in prompt(i)]
    outputs = {}
    for on in (True, False):
        engine = lora_engine(tmp_path / "base", cpu_linear="stream", max_num_seqs=8, max_lora_rank=8,
                             lora_pool_pages=8 * 8 + 1, screened_greedy_head=on)
        assert (engine.runner.greedy_head is not None) == on
        for name, (adapter_id, _) in ADAPTERS.items():
            engine.adapter_hook.register_adapter(name, adapter_id, 1, str(folders[name]))
        alone = {f"{k}": run(engine, {"x": (ids(0), GREEDY, k)})["x"] for k in keys}
        mixed = run(engine, {f"{k}": (ids(0), GREEDY, k) for k in keys})
        assert mixed == alone
        outputs[on] = alone
        if on:  # base and plain-LoRA rows alone took it
            assert engine.runner.greedy_head.num_rows > 0
    assert outputs[True] == outputs[False]
