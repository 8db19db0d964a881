"""MixLoRA served in mixed batches: logits of MixLoRA rows (top-k, dynamic, rsLoRA, expert_lora overrides) beside
base and plain-LoRA rows equal an independent float64 reference of the whole model (transformers' Llama with the
block of adapters/mixlora.py's ffn_reference), with the CPU kernels and with the plain-torch paths; the
`mixlora` package's own loader on the default model; the pair ops against their references."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from loraplex.adapters.mixlora import load_mixlora
from loraplex.adapters.ops import mixlora as mixops
from loraplex.adapters.ops.mixlora import RoutingGroup, route_pairs
from loraplex.adapters.peft import load_adapter
from loraplex.adapters.runtime import LoRARuntime, check_limits
from loraplex.adapters.synthetic import write_random_mixlora
from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.loader import load_model
from tests.adapters.peft_factory import write_random_peft
from tests.adapters.test_lora_parity import lora_runner, make_requests
from tests.engine.test_models import TINY_CONFIGS, randomize

ATOL = 1e-4

# name: (adapter id, kind, options)
ADAPTERS = {
    "topk": (1, "mixlora", {"r": 8, "alpha": 16, "num_experts": 4, "top_k": 2}),
    "topk-rslora-experts": (2, "mixlora", {
        "r": 4, "alpha": 8, "num_experts": 6, "top_k": 3,
        "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "extra_config": {"use_rslora": True, "expert_lora": {"r": 6, "lora_alpha": 3}}}),
    "dynamic": (3, "mixlora", {"r": 8, "alpha": 16, "num_experts": 4, "routing_strategy": "mixlora-dynamic",
                               "extra_config": {"top_p": 0.6}}),
    "dynamic-t": (4, "mixlora", {"r": 4, "alpha": 4, "num_experts": 8, "routing_strategy": "mixlora-dynamic",
                                 "target_modules": ("v_proj", "up_proj", "down_proj"),
                                 "extra_config": {"top_p": 0.9, "temperature": 0.5}}),
    "lora": (5, "lora", {"r": 8, "target_modules": ("q_proj", "v_proj", "gate_proj", "down_proj")}),
}


def _write(tmp_path, config, name, seed):
    _, kind, opts = ADAPTERS[name]
    if kind == "lora":
        return write_random_peft(tmp_path / name, config, seed=seed, std=0.3, **opts)
    return write_random_mixlora(tmp_path / name, config, seed=seed, std=0.3, **opts)


class Float64Reference:
    """transformers' Llama in float64 with one adapter's deltas hooked in: attention LoRA on the projections,
    the MixLoRA block (ffn_reference) in place of every FFN, or plain LoRA on any linear."""

    def __init__(self, folder_hf):
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(folder_hf, dtype=torch.float64).eval()
        self.adapter = None  # MixLoRAWeights | LoRAWeights | None
        for layer, decoder in enumerate(self.hf.model.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                parent = decoder.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else decoder.mlp
                getattr(parent, proj).register_forward_hook(self._lora_hook(layer, proj))
            decoder.mlp.forward = self._mlp(layer, decoder.mlp, decoder.mlp.forward)

    def _pair(self, layer, proj):
        a = self.adapter
        if a is None:
            return None
        tensors = a.attention if hasattr(a, "attention") else a.tensors
        return tensors.get((layer, proj))

    def _lora_hook(self, layer, proj):
        def hook(module, args, out):
            pair = self._pair(layer, proj)
            if pair is None:
                return out
            a, b = pair
            return out + args[0] @ a.double().T @ b.double().T
        return hook

    def _mlp(self, layer, mlp, plain):
        from loraplex.adapters.mixlora import ffn_reference

        def forward(x):
            if not hasattr(self.adapter, "router"):
                return plain(x)
            out, _ = ffn_reference(self.adapter, layer, x.reshape(-1, x.shape[-1]), mlp.gate_proj.weight,
                                   mlp.up_proj.weight, mlp.down_proj.weight)
            return out.reshape(x.shape)
        return forward

    def logits(self, adapter, ids):
        self.adapter = adapter
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixlora_tiny")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama_gqa"]()).eval()
    randomize(hf)
    hf.save_pretrained(path / "base")
    model, config = load_model(path / "base", torch.float32)
    folders = {name: _write(path, config, name, seed) for seed, name in enumerate(ADAPTERS)}
    runtime = LoRARuntime(model, config, torch.float32, torch.device("cpu"), max_lora_rank=16, num_pages=200,
                          max_cpu_loras=8, max_mixlora_adapters=4, max_mixlora_experts=8)
    for name, (adapter_id, *_) in ADAPTERS.items():
        runtime.register_adapter(name, adapter_id, 1, str(folders[name]))
    ref = Float64Reference(path / "base")
    loaded = {name: (load_adapter(f, config, 64, dtype=torch.float64) if ADAPTERS[name][1] == "lora"
                     else load_mixlora(f, config, 64, dtype=torch.float64)) for name, f in folders.items()}
    return model, config, runtime, ref, loaded


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "plain-torch"])
def test_mixed_batch_matches_the_float64_reference(tiny, kernels):
    model, config, runtime, ref, loaded = tiny
    if kernels and not cpu_kernels.available():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels.build_error()}")
    gen = torch.Generator().manual_seed(0)
    which = {"b": None, "k1": "topk", "k2": "topk", "rs": "topk-rslora-experts", "d": "dynamic", "dt": "dynamic-t",
             "l": "lora", "b2": None}
    seqs = {k: torch.randint(0, config.vocab_size, (9,), generator=gen).tolist() for k in which}
    requests = make_requests(runtime, seqs, which, ADAPTERS)
    schedule = [  # prefills of several kinds together, then decodes beside a chunked prefill, then decodes
        [("b", 6), ("k1", 5), ("rs", 7), ("l", 4)],
        [("b", 1), ("k1", 1), ("rs", 1), ("l", 1), ("k2", 6), ("d", 5), ("dt", 8), ("b2", 3)],
        [("b", 1), ("k1", 1), ("rs", 1), ("l", 1), ("k2", 1), ("d", 1), ("dt", 1), ("b2", 6)],
    ]
    context = cpu_kernels.suspended() if not kernels else _nothing()
    with context:
        ours = lora_runner(model, config, runtime, requests).run(seqs, schedule)
    for name, logits in ours.items():
        adapter = loaded[which[name]] if which[name] else None
        want = ref.logits(adapter, seqs[name][:logits.shape[0]])
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    for name in ("k1", "rs", "d", "dt"):  # every MixLoRA really changes the output
        n = ours[name].shape[0]
        assert (ours[name] - ref.logits(None, seqs[name][:n])).abs().max() > 0.05, name
    for req in requests.values():
        runtime.release(req, finished=True)
    assert all(runtime.pool.pin_count(k) == 0 for k in runtime.pool.resident)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_pages_and_router_slots_come_back(tiny, tmp_path):
    """A MixLoRA takes max(r, r_e) + (E-1) r_e pages and a router slot; both are freed on eviction, and an
    adapter that needs more pages than the pool has, or more experts than the server takes, is refused."""
    _, config, runtime, _, loaded = tiny
    assert loaded["topk"].num_pages == 8 + 3 * 8
    assert loaded["topk-rslora-experts"].num_pages == 6 + 5 * 6
    pool = runtime.pool
    for key in list(pool.resident):
        if pool.pin_count(key) == 0:
            pool.evict(key)
    assert pool.num_used_pages == 0 and pool.num_free_slots == pool.num_slots
    from loraplex.adapters.errors import AdapterError
    big = load_mixlora(write_random_mixlora(tmp_path / "big", config, r=16, num_experts=8, top_k=2), config, 16)
    assert big.num_pages == 128
    with pytest.raises(AdapterError, match="needs 128 pool pages"):
        check_limits(big, dict(runtime.limits(), pool_pages=100))
    many = write_random_mixlora(tmp_path / "many", config, r=1, num_experts=12, top_k=2)
    with pytest.raises(AdapterError, match="max-mixlora-experts"):
        runtime.register_adapter("many", 98, 1, str(many))
    assert (98, 1) not in runtime.registry


@torch.inference_mode()  # the kernels serve inference only (autograd takes the torch ops)
def test_routing_and_expert_ops_match_their_references():
    if not cpu_kernels.available():
        pytest.skip("CPU kernels unavailable")
    gen = torch.Generator().manual_seed(0)
    slots, experts, hidden, inter = 3, 4, 64, 96
    router = torch.randn(slots * experts, hidden, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(20, hidden, generator=gen).to(dtype)
        rows = torch.tensor([3, 5, 7, 8, 9, 15, 0, 1])
        row_slots = torch.tensor([2, 2, 0, 0, 0, 1, 1, 1])
        got = mixops.router_logits(x, router, rows, row_slots, experts)
        want = mixops.router_logits_ref(x, router, rows, row_slots, experts)
        assert mixops._kernel_ok(x, router)  # the kernel ran, not the reference again
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        # row by row: a row's logits are bit-identical alone and in the batch
        for i in range(len(rows)):
            assert torch.equal(mixops.router_logits(x, router, rows[i:i + 1], row_slots[i:i + 1], experts)[0], got[i])
    # the expert op over pairs against the per-pair gather
    num_pages = 40
    a_pool, b_pool = torch.randn(num_pages, hidden, generator=gen), torch.randn(num_pages, inter, generator=gen)
    a_pool[0], b_pool[0] = 0, 0
    vid_pages = torch.randint(1, num_pages, (slots * experts, 4), generator=gen)
    vid_ranks = torch.full((slots * experts,), 4)
    vid_pages[:, 3] = 0  # rank 3 in effect: padding pages are the zero page
    x = torch.randn(20, hidden, generator=gen)
    mask = torch.ones(8, experts, dtype=torch.bool)
    groups = [RoutingGroup(0, 5, "mixlora", 2, 0.8, 0.0), RoutingGroup(5, 8, "mixlora-dynamic", 0, 0.7, 0.0)]
    pairs = route_pairs(x, router, rows, row_slots, mask, groups, experts, vid_pages, vid_ranks)
    y = torch.randn(pairs.rows.numel(), inter, generator=gen)
    xp = x.index_select(0, pairs.rows)
    want = y.clone()
    mixops.expert_apply_ref(want, xp, a_pool, b_pool, pairs.pages)
    got = y.clone()
    mixops.expert_apply(got, xp, a_pool, b_pool, pairs)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # top-k routing in one kernel call equals the torch ops (rows with fewer experts than the slot holds too)
    counts = torch.tensor([4, 4, 3, 3, 3, 2, 2, 2])
    fewer = torch.arange(experts).unsqueeze(0) < counts.unsqueeze(1)
    topk = [RoutingGroup(0, 8, "mixlora", 2, 0.8, 0.0)]
    fused = route_pairs(x, router, rows, row_slots, fewer, topk, experts, vid_pages, vid_ranks, counts)
    with cpu_kernels.suspended():
        plain = route_pairs(x, router, rows, row_slots, fewer, topk, experts, vid_pages, vid_ranks, counts)
    assert fused.local is None and plain.local is not None and fused.top_k == plain.top_k == 2
    for field in ("rows", "pages", "ranks"):
        assert torch.equal(getattr(fused, field), getattr(plain, field)), field
    torch.testing.assert_close(fused.weights, plain.weights, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-5, rtol=1e-6)
    # the whole pair FFN in one kernel call against the torch ops: float32 and bfloat16, gate/up as views of one
    # fused output (strided rows), some modules without experts
    pools = {m: (torch.randn(num_pages, i, generator=gen), torch.randn(num_pages, o, generator=gen) * 0.1)
             for m, (i, o) in {"gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                               "down_proj": (inter, hidden)}.items()}
    for a, b in pools.values():
        a[0], b[0] = 0, 0
    gate_up = torch.randn(20, 2 * inter, generator=gen)
    for dtype, modules in ((torch.float32, {"gate_proj", "up_proj", "down_proj"}), (torch.bfloat16, {"up_proj"}),
                           (torch.float32, {"gate_proj", "down_proj"})):
        cast = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in pools.items()}
        gu, xd = gate_up.to(dtype), x.to(dtype)
        g, u = gu[:, :inter], gu[:, inter:]
        got = mixops.ffn_pairs(g, u, xd, rows, fused, cast, frozenset(modules))
        want = mixops.ffn_pairs_ref(g, u, xd, rows, fused, cast, frozenset(modules))
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(got[0].float(), want[0].float(), atol=tol, rtol=tol)
        assert (got[1] is None) == (want[1] is None) == ("down_proj" not in modules)
        if got[1] is not None:
            torch.testing.assert_close(got[1].float(), want[1].float(), atol=tol, rtol=tol)
    # the pairs: top-k rows have 2 each, weights summing to 1; dynamic rows keep a prefix reaching 0.7
    per_row = torch.bincount(pairs.rows, minlength=20)
    assert per_row[rows[:5]].tolist() == [2] * 5
    for r in rows[:5].tolist():
        assert abs(pairs.weights[pairs.rows == r].sum().item() - 1) < 1e-6
    for r in rows[5:].tolist():
        assert pairs.weights[pairs.rows == r].sum().item() >= 0.7 - 1e-6


def test_default_model_matches_the_mixlora_package(default_model_dir, tmp_path):
    """The `mixlora` package's loader (MixLoraModelForCausalLM's injection, top-k, LoRA dropout off by hand) on the
    default model: every logit of a MixLoRA row in a batch with base rows within 1e-4 of it (float32)."""
    pytest.importorskip("mixlora")
    from mixlora.model import inject_adapter_in_model, load_adapter_weights
    model, config = load_model(default_model_dir, torch.float32)
    folder = write_random_mixlora(tmp_path / "m", config, r=8, alpha=16, num_experts=8, top_k=2, std=0.05,
                                  write_bin=True, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"))
    raw = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, "base_model_name_or_path": "unused"}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    seqs = {k: torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for k, n in (("m", 12), ("b", 7))}
    with torch.no_grad():
        base = hf(torch.tensor([seqs["m"]])).logits[0]
    mix_config, weights = load_adapter_weights(str(folder), device="cpu", dtype=torch.float32)
    inject_adapter_in_model(hf, mix_config, weights)
    for module in hf.modules():  # the package leaves LoRA dropout on at inference (shared/research §1.9)
        for lora in getattr(module, "mixlora_moes", {}).values():
            for expert in lora.experts_.values():
                expert.eval()
    hf.eval()
    runtime = LoRARuntime(model, config, torch.float32, torch.device("cpu"), max_lora_rank=16, num_pages=80,
                          max_cpu_loras=2, max_mixlora_adapters=2, max_mixlora_experts=8)
    runtime.register_adapter("m", 1, 1, str(folder))
    requests = {"m": Request("m", seqs["m"], SamplingParams(), adapter_id=1, adapter_version=1),
                "b": Request("b", seqs["b"], SamplingParams())}
    for req in requests.values():
        runtime.add_request(req)
        assert runtime.admit(req)
    ours = lora_runner(model, config, runtime, requests, block_size=16, num_blocks=8).run(
        seqs, [[("m", 8), ("b", 7)], [("m", 4)]])
    with torch.no_grad():
        want = hf(torch.tensor([seqs["m"]])).logits[0]
    torch.testing.assert_close(ours["m"], want, atol=ATOL, rtol=0)
    assert (want - base).abs().max() > 0.05  # the adapter matters


def test_greedy_alone_equals_inside_a_busy_batch_and_aborts_give_everything_back(default_model_dir, tmp_path):
    """LLMEngine on a tiny model: each MixLoRA request's greedy output alone equals its output among base, LoRA
    and other MixLoRA rows (prefills and decodes interleaved, a pool that must evict), and after preemption
    and aborts every KV block, pool page and router slot is back."""
    from loraplex.engine.llm_engine import _read_model_config
    from tests.adapters.peft_factory import make_tiny_model
    from tests.adapters.test_lora_engine import GREEDY, lora_engine, prompt, run
    tiny_dir = make_tiny_model(tmp_path / "tiny", default_model_dir)
    config = _read_model_config(str(tiny_dir))
    kinds = {1: write_random_mixlora(tmp_path / "m1", config, r=8, num_experts=4, top_k=2, seed=1, std=0.3),
             2: write_random_mixlora(tmp_path / "m2", config, r=4, num_experts=8, top_k=1, seed=2, std=0.3,
                                     extra_config={"expert_lora": {"r": 8, "lora_alpha": 8}}),
             3: write_random_mixlora(tmp_path / "m3", config, r=8, num_experts=4, routing_strategy="mixlora-dynamic",
                                     seed=3, std=0.3),
             4: write_random_peft(tmp_path / "l4", config, r=8, seed=4, std=0.3)}
    # 100 pages hold two of the three MixLoRAs (32 + 64 + 32 pages) and the LoRA (8): the busy batch evicts
    engine = lora_engine(tiny_dir, lora_pool_pages=101, max_mixlora_adapters=2)
    hook = engine.adapter_hook
    for adapter_id, folder in kinds.items():
        hook.register_adapter(f"a{adapter_id}", adapter_id, 1, str(folder))
    keys = [None, (1, 1), (2, 1), (3, 1), (4, 1)]
    alone = {f"{k}-{j}": run(engine, {"x": (prompt(j), GREEDY, k)})["x"] for k in keys for j in range(2)}
    assert len({tuple(v) for v in alone.values()}) > 6  # the adapters really change greedy output
    # in one batch: two MixLoRAs at a time fit the router slots, so the scheduler admits in waves
    mixed = run(engine, {f"{k}-{j}": (prompt(j), GREEDY, k) for j in range(2) for k in keys})
    assert mixed == alone
    assert hook.pool.num_evictions > 0

    engine = lora_engine(tiny_dir, lora_pool_pages=101, max_mixlora_adapters=2, num_gpu_blocks_override=24,
                         max_num_seqs=8, block_size=16)
    hook = engine.adapter_hook
    for adapter_id, folder in kinds.items():
        hook.register_adapter(f"a{adapter_id}", adapter_id, 1, str(folder))
    kv = engine.scheduler.kv_cache_manager
    free_pages, free_blocks = hook.pool.num_free_pages, kv.num_free_blocks
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for j in range(10):
        engine.add_request(f"q{j}", prompt(j) * 4, params, adapter=keys[j % 5])
    for step in range(400):
        if not engine.has_unfinished_requests():
            break
        engine.step()
        if step == 15:
            engine.abort_requests(["q1", "q2", "q3"])
    assert kv.num_free_blocks == free_blocks and not hook._pinned
    assert all(hook.pool.pin_count(k) == 0 for k in hook.pool.resident)
    for adapter_id in kinds:
        hook.unregister_adapter(adapter_id)
    assert hook.pool.num_free_pages == free_pages and hook.pool.num_free_slots == 2 and not hook.registry
