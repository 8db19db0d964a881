"""Per-request adapter strength and several adapters per request (adapters/composition.py), against peft: a scaled
adapter (LoraLayer.scale_layer), Σ wᵢ·ΔWᵢ (add_weighted_adapter "cat"), and the merged methods ties, dare_linear,
dare_ties, magnitude_prune (add_weighted_adapter with the same seed) — all in ONE mixed batch with plain-adapter and
base rows, each row matching its own reference; then the engine: greedy alone equals greedy in a busy batch, pins
back to zero, a merged adapter evicted and rebuilt identically, bad compositions refused with nothing changed."""
from __future__ import annotations

import contextlib
import hashlib

import pytest
import torch
import transformers

from loraplex.adapters.composition import Composition, merge_lora
from loraplex.adapters.errors import AdapterError
from loraplex.adapters.peft import load_adapter
from loraplex.adapters.runtime import LoRARuntime, merged_key
from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.loader import load_model
from tests.adapters.peft_factory import (
    add_random_adapter,
    make_tiny_model,
    save_adapter,
    write_random_peft,
)
from tests.adapters.test_lora_engine import GREEDY, lora_engine, prompt, run
from tests.adapters.test_lora_parity import lora_runner
from tests.engine.test_models import TINY_CONFIGS, randomize

ATOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (adapter_id, r, alpha, target_modules)
    "u1": (1, 8, 16, ["q_proj", "v_proj"]),
    "u2": (2, 8, 8, ALL),
    "u3": (3, 4, 8, ["k_proj", "o_proj", "down_proj"]),
    "u4": (4, 8, 32, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}
KEYS = {name: (spec[0], 1) for name, spec in ADAPTERS.items()}


def comp(parts, method="linear", scale=1.0, **kw) -> Composition:
    return Composition(tuple((*KEYS[n], float(w)) for n, w in parts), method, scale=scale, **kw)


# name: (composition or None = the plain adapter / base model, how peft builds the reference)
CASES = {
    "base": (None, None),
    "plain-b": (None, "u2"),
    "b-x0.5": (comp([("u2", 1)], scale=0.5), ("scale", "u2", 0.5)),
    "b-x-1.5": (comp([("u2", 1)], scale=-1.5), ("scale", "u2", -1.5)),
    "a-x2": (comp([("u1", 1)], scale=2.0), ("scale", "u1", 2.0)),
    "linear-abc": (comp([("u1", 0.7), ("u2", -0.4), ("u3", 1.2)]), ("cat", ["u1", "u2", "u3"], [0.7, -0.4, 1.2], {})),
    "linear-abc-x0.5": (comp([("u1", 0.7), ("u2", -0.4), ("u3", 1.2)], scale=0.5),
                        ("cat", ["u1", "u2", "u3"], [0.35, -0.2, 0.6], {})),
    "ties-abd": (comp([("u1", 0.6), ("u2", 0.9), ("u4", -0.5)], "ties", density=0.5),
                 ("ties", ["u1", "u2", "u4"], [0.6, 0.9, -0.5], dict(density=0.5))),
    "ties-freq": (comp([("u1", 1.0), ("u4", 0.8)], "ties", density=0.7, majority_sign_method="frequency"),
                  ("ties", ["u1", "u4"], [1.0, 0.8], dict(density=0.7, majority_sign_method="frequency"))),
    "dare-linear": (comp([("u1", 0.5), ("u2", 1.0)], "dare_linear", density=0.6, seed=7),
                    ("dare_linear", ["u1", "u2"], [0.5, 1.0], dict(density=0.6), 7)),
    "dare-ties": (comp([("u2", 0.8), ("u4", 0.7)], "dare_ties", density=0.4, seed=3),
                  ("dare_ties", ["u2", "u4"], [0.8, 0.7], dict(density=0.4), 3)),
    "magnitude-prune": (comp([("u1", 1.0), ("u2", 0.5)], "magnitude_prune", density=0.3),
                        ("magnitude_prune", ["u1", "u2"], [1.0, 0.5], dict(density=0.3))),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("composition")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama_gqa"]()).eval()
    randomize(hf)
    hf.save_pretrained(tmp / "base")
    peft_model, folders = hf, {}
    for seed, (name, (_, r, alpha, targets)) in enumerate(ADAPTERS.items()):
        peft_model = add_random_adapter(peft_model, name, r=r, alpha=alpha, target_modules=targets, seed=seed,
                                        std=0.2)
        folders[name] = save_adapter(peft_model, name, tmp / "peft")
    model, config = load_model(tmp / "base", torch.float32)
    runtime = LoRARuntime(model, config, torch.float32, torch.device("cpu"), max_lora_rank=16, num_pages=200,
                          max_cpu_loras=16)
    for name, key in KEYS.items():
        runtime.register_adapter(name, *key, str(folders[name]))
    return peft_model, model, config, runtime, folders


@contextlib.contextmanager
def masks_seeded(peft_model, seed):
    """Seed torch's global generator when add_weighted_adapter starts merging (its first module), not before the
    call: the new adapter's initialisation draws from it first, so seeding before the call would make PEFT's masks
    depend on its init code. From there PEFT draws its DARE masks in its own order, which merge_lora follows."""
    if seed is None:
        yield
        return
    model = peft_model.base_model
    original = model._generalized_task_arithmetic_weighted_adapter
    first = [True]

    def seeded(*args, **kwargs):
        if first[0]:
            torch.manual_seed(seed)
            first[0] = False
        return original(*args, **kwargs)
    model._generalized_task_arithmetic_weighted_adapter = seeded
    try:
        yield
    finally:
        del model._generalized_task_arithmetic_weighted_adapter


def merged_name(recipe) -> str:
    return "m" + hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]


def peft_reference(peft_model, recipe, ids):
    """Logits of peft for one case: disabled adapters, one adapter (scaled with LoraLayer.scale_layer), or an
    adapter made by add_weighted_adapter."""
    from peft.tuners.lora import LoraLayer
    x = torch.tensor([ids])
    with torch.no_grad():
        if recipe is None:
            with peft_model.disable_adapter():
                return peft_model(x).logits[0]
        if isinstance(recipe, str):
            peft_model.set_adapter(recipe)
            return peft_model(x).logits[0]
        if recipe[0] == "scale":
            _, name, scale = recipe
            peft_model.set_adapter(name)
            layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
            for m in layers:
                m.scale_layer(scale)
            try:
                return peft_model(x).logits[0]
            finally:
                for m in layers:
                    m.unscale_layer(scale)
        method, names, weights, kw, *seed = recipe
        merged = merged_name(recipe)
        if merged not in peft_model.peft_config:
            with masks_seeded(peft_model, seed[0] if seed else None):
                peft_model.add_weighted_adapter(names, weights, merged, combination_type=method, **kw)
        peft_model.set_adapter(merged)
        return peft_model(x).logits[0]


def ready(runtime, request) -> None:
    runtime.add_request(request)
    for _ in range(200):
        if not request.waiting_for_adapter:
            break
        assert runtime.poll(wait_s=0.1) == []
    assert runtime.admit(request)


def test_every_kind_in_one_batch_matches_peft(setup):
    peft_model, model, config, runtime, _ = setup
    gen = torch.Generator().manual_seed(0)
    seqs = {name: torch.randint(0, config.vocab_size, (6 + i % 5,), generator=gen).tolist()
            for i, name in enumerate(CASES)}
    requests = {}
    for name, (mix, recipe) in CASES.items():
        key = (0, 0) if recipe is None else KEYS[recipe] if mix is None else mix.adapter_keys()[0]
        requests[name] = Request(name, seqs[name], SamplingParams(), adapter_id=key[0], adapter_version=key[1],
                                 adapter_mix=mix)
        ready(runtime, requests[name])
    names = list(CASES)
    half = names[: len(names) // 2]
    # step 1 prefills half; step 2 decodes those while the rest prefill; step 3 decodes everyone
    schedule = [[(n, len(seqs[n]) - 1) for n in half],
                [(n, 1) for n in half] + [(n, len(seqs[n]) - 1) for n in names if n not in half],
                [(n, 1) for n in names if n not in half]]
    ours = lora_runner(model, config, runtime, requests, block_size=4, num_blocks=96).run(seqs, schedule)
    refs = {}
    for name, logits in ours.items():
        refs[name] = peft_reference(peft_model, CASES[name][1], seqs[name][:logits.shape[0]])
        torch.testing.assert_close(logits, refs[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    # the cases really differ from each other (a scale or weight ignored would pass for a plain adapter)
    b = peft_reference(peft_model, "u2", seqs["b-x0.5"])
    assert (ours["b-x0.5"] - b).abs().max() > 0.05
    other_seed = ("dare_linear", ["u1", "u2"], [0.5, 1.0], dict(density=0.6), 8)
    assert (refs["dare-linear"] - peft_reference(peft_model, other_seed, seqs["dare-linear"])).abs().max() > 0.01
    # rows of one adapter at different strengths share its pages: no copy of the adapter in the pool
    assert not any(isinstance(k[0], str) and k[1].method == "linear" for k in runtime.pool.resident)
    for request in requests.values():
        runtime.release(request, finished=True)
    assert all(runtime.pool.pin_count(k) == 0 for k in runtime.pool.resident)
    assert all(e.num_requests == 0 for e in runtime.registry.values())


def test_merge_matches_peft_adapter_weights(setup):
    """merge_lora's A and B are add_weighted_adapter's, tensor for tensor (DARE with the same seed)."""
    peft_model, model, config, runtime, folders = setup
    loaded = {n: load_adapter(folders[n], config, 16) for n in ADAPTERS}
    recipe = CASES["dare-ties"][1]
    mix = CASES["dare-ties"][0]
    merged = merge_lora([(loaded[n], w) for n, w in zip(recipe[1], recipe[2])], mix)
    peft_reference(peft_model, recipe, [1, 2, 3])  # builds the peft adapter
    name = merged_name(recipe)
    state = {k: v for k, v in peft_model.state_dict().items() if f".{name}." in k}
    layer, module = 1, "v_proj"
    a = state[f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_A.{name}.weight"]
    b = state[f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_B.{name}.weight"]
    torch.testing.assert_close(merged.tensors[layer, module][0], a, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged.tensors[layer, module][1], b, atol=1e-6, rtol=0)
    again = merge_lora([(loaded[n], w) for n, w in zip(recipe[1], recipe[2])], mix)
    assert all(torch.equal(again.tensors[k][i], merged.tensors[k][i]) for k in merged.tensors for i in (0, 1))
    other = merge_lora([(loaded[n], w) for n, w in zip(recipe[1], recipe[2])],
                       Composition(mix.parts, mix.method, mix.density, seed=mix.seed + 1))
    assert not torch.equal(other.tensors[layer, module][0], merged.tensors[layer, module][0])


def test_bad_compositions_are_refused(setup):
    *_, runtime, _ = setup
    with pytest.raises(AdapterError, match="density"):
        comp([("u1", 1), ("u2", 1)], "ties", density=-0.1)
    with pytest.raises(AdapterError, match="merge method"):
        comp([("u1", 1), ("u2", 1)], "svd")
    with pytest.raises(AdapterError, match="twice"):
        comp([("u1", 1), ("u1", 2)])
    with pytest.raises(AdapterError, match="majority_sign_method"):
        comp([("u1", 1), ("u2", 1)], "ties", majority_sign_method="most")
    before = {k: e.num_requests for k, e in runtime.registry.items()}
    bad = {"unknown": Composition(((*KEYS["u1"], 1.0), (99, 1, 1.0))),
           "ranks": comp([("u1", 1), ("u3", 1)], "ties", density=0.5)}
    for what, mix in bad.items():
        request = Request(what, [1, 2, 3], SamplingParams(), adapter_id=1, adapter_version=1, adapter_mix=mix)
        with pytest.raises(AdapterError, match="not loaded" if what == "unknown" else "one rank"):
            runtime.add_request(request)
    assert {k: e.num_requests for k, e in runtime.registry.items()} == before
    assert not runtime.has_pending


@pytest.fixture(scope="module")
def engine_setup(tmp_path_factory, default_model_dir):
    tmp = tmp_path_factory.mktemp("composition_engine")
    tiny_dir = make_tiny_model(tmp / "tiny", default_model_dir)
    from loraplex.engine.llm_engine import _read_model_config
    config = _read_model_config(str(tiny_dir))
    folders = [write_random_peft(tmp / f"e{i}", config, r=8, seed=40 + i, std=0.3,
                                 target_modules=("q_proj", "v_proj", "down_proj") if i % 2 else ALL)
               for i in range(3)]
    return tiny_dir, folders


def test_greedy_alone_equals_busy_batch_and_merged_adapters_rebuild(engine_setup):
    tiny_dir, folders = engine_setup
    engine = lora_engine(tiny_dir, max_cpu_loras=4, lora_pool_pages=4 * 8 + 1)
    hook = engine.adapter_hook
    for i, folder in enumerate(folders):
        hook.register_adapter(f"e{i}", i + 1, 1, str(folder))
    e = [(i + 1, 1) for i in range(3)]
    kinds = {
        "base": None, "plain": e[0], "scaled": (*e[0], Composition(((*e[0], 1.0),), scale=0.4)),
        "linear": (*e[0], Composition(((*e[0], 0.8), (*e[1], -0.6), (*e[2], 0.5)))),
        "ties": (*e[1], Composition(((*e[1], 1.0), (*e[2], 0.7)), "ties", density=0.5)),
        "dare": (*e[0], Composition(((*e[0], 0.9), (*e[2], 0.9)), "dare_ties", density=0.5, seed=1)),
    }
    alone = {f"{k}-{j}": run(engine, {"x": (prompt(j), GREEDY, a)})["x"] for k, a in kinds.items() for j in range(2)}
    assert len({tuple(v) for v in alone.values()}) >= 10  # every kind changes greedy output
    mixed = run(engine, {f"{k}-{j}": (prompt(j), GREEDY, a) for j in range(2) for k, a in kinds.items()})
    assert mixed == alone
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_total_blocks and not hook._pinned
    assert all(hook.pool.pin_count(k) == 0 for k in hook.pool.resident)
    # evict the merged adapters from the pool and the host tier: the next request builds them again, identically
    ties_key = merged_key(kinds["ties"][2])
    before = hook.host[ties_key].tensors[0, "v_proj"][0].clone()
    for key in [k for k in hook.pool.resident if isinstance(k[0], str)]:
        hook.pool.evict(key)
        hook.host.pop(key, None)
    assert not hook._merged_ready(ties_key)
    again = run(engine, {f"{k}-0": (prompt(0), GREEDY, kinds[k]) for k in ("ties", "dare")})
    assert again == {k: alone[k] for k in ("ties-0", "dare-0")}
    assert torch.equal(hook.host[ties_key].tensors[0, "v_proj"][0], before)
    # aborts while the merge is built and after admission: pins and request counts back to zero
    for key in [k for k in hook.pool.resident if isinstance(k[0], str)]:
        hook.pool.evict(key)
        hook.host.pop(key, None)
    engine.add_request("w", prompt(3), GREEDY, adapter=kinds["ties"])
    engine.add_request("r", prompt(4), GREEDY, adapter=kinds["linear"])
    engine.step()
    engine.abort_requests(["w", "r"])
    while engine.has_unfinished_requests() or hook.has_pending:
        engine.step()
    assert not hook._pinned and not hook._merge_waiters
    assert all(hook.pool.pin_count(k) == 0 for k in hook.pool.resident)
    assert all(entry.num_requests == 0 for entry in hook.registry.values())
    assert kv.num_free_blocks == kv.num_total_blocks
