"""Logits parity with peft: the default model and adapters of ranks 4-64 (attention-only, all-linear,
rsLoRA) in ONE mixed batch with base-model rows; each row matches peft with its own adapter."""
import pytest
import torch
import transformers

from loraplex.adapters.runtime import LoRARuntime
from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.core.scheduler import ScheduledRequest
from loraplex.engine.loader import load_model
from tests.adapters.peft_factory import add_random_adapter, save_adapter
from tests.engine.test_models import DEFAULT_MODEL_ATOL, TINY_CONFIGS, PagedRunner, randomize

ATOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (adapter_id, r, alpha, target_modules, use_rslora)
    "r4-attn": (1, 4, 8, ["q_proj", "v_proj"], False),
    "r8-all": (2, 8, 16, "all-linear", False),
    "r16-rslora": (3, 16, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], True),
    "r64-all": (4, 64, 16, ALL, False),
}


def build_setup(path, tmp_path, num_pages=100, max_rank=64, extra_adapters=None, device="cpu"):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = hf
    adapters = dict(ADAPTERS, **(extra_adapters or {}))
    folders = {}
    for seed, (name, (_, r, alpha, targets, rslora)) in enumerate(adapters.items()):
        peft_model = add_random_adapter(peft_model, name, r=r, alpha=alpha, target_modules=targets,
                                        use_rslora=rslora, seed=seed)
        folders[name] = save_adapter(peft_model, name, tmp_path / "peft")
    model, config = load_model(path, torch.float32, device=device)
    runtime = LoRARuntime(model, config, torch.float32, torch.device(device), max_lora_rank=max_rank,
                          num_pages=num_pages, max_cpu_loras=8)
    for name, (adapter_id, *_) in adapters.items():
        runtime.register_adapter(name, adapter_id, 1, str(folders[name]))
    return peft_model, model, config, runtime, adapters


def peft_logits(peft_model, adapter, ids):
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(torch.tensor([ids])).logits[0]
        peft_model.set_adapter(adapter)
        return peft_model(torch.tensor([ids])).logits[0]


def lora_runner(model, config, runtime, requests, **kw):
    """A PagedRunner whose every step tells the runtime which rows use which adapter."""
    def before_forward(items, starts, batch):
        scheduled = [ScheduledRequest(requests[name], n, start, [], True) for (name, n), start in zip(items, starts)]
        runtime.prepare(scheduled, batch)
    return PagedRunner(model, config, before_forward=before_forward, **kw)


def run_mixed_batch(model, config, runtime, which, adapters, seed: int, first: int = 0):
    """Every request of `which` (name -> its adapter in `adapters`, or None) with a few random tokens, admitted and
    run in one paged batch: half of them prefill, then decode beside the other half's prefill, then the rest
    decode. -> (logits per request, token ids per request, requests)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = {k: torch.randint(0, config.vocab_size, (5 + i % 4,), generator=gen).tolist() for i, k in enumerate(which)}
    requests = make_requests(runtime, seqs, which, adapters)
    names = list(which)
    early = names[first::2]
    schedule = [[(n, len(seqs[n]) - 1) for n in early],
                [(n, 1) for n in early] + [(n, len(seqs[n]) - 1) for n in names if n not in early],
                [(n, 1) for n in names if n not in early]]
    ours = lora_runner(model, config, runtime, requests, block_size=4, num_blocks=96).run(seqs, schedule)
    return ours, seqs, requests


def make_requests(runtime, seqs, which, adapters=None):
    """{name: admitted Request}; which[name] names its adapter in `adapters` (default ADAPTERS), or None."""
    adapters = ADAPTERS if adapters is None else adapters
    requests = {}
    for name, ids in seqs.items():
        adapter_id = adapters[which[name]][0] if which[name] else 0
        req = Request(name, ids, SamplingParams(), adapter_id=adapter_id, adapter_version=1 if adapter_id else 0)
        runtime.add_request(req)
        assert runtime.admit(req)
        requests[name] = req
    return requests


@pytest.fixture(scope="module")
def smol_lora(default_model_dir, tmp_path_factory):
    return build_setup(default_model_dir, tmp_path_factory.mktemp("smol_lora"))


def test_mixed_adapter_batch_matches_peft(smol_lora):
    peft_model, model, config, runtime, _ = smol_lora
    gen = torch.Generator().manual_seed(0)
    lens = {"base": 12, "a4": 10, "a8": 9, "a8b": 7, "a16": 11, "a64": 8, "base2": 6}
    which = {"base": None, "a4": "r4-attn", "a8": "r8-all", "a8b": "r8-all", "a16": "r16-rslora",
             "a64": "r64-all", "base2": None}
    seqs = {k: torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for k, n in lens.items()}
    requests = make_requests(runtime, seqs, which)
    # step 1 prefills three; step 2 decodes those while the rest prefill (a16 in two chunks); then decodes
    schedule = [
        [("base", 10), ("a4", 8), ("a8", 7)],
        [("base", 1), ("a4", 1), ("a8", 1), ("a8b", 5), ("a16", 6), ("a64", 6), ("base2", 5)],
        [("base", 1), ("a4", 1), ("a8", 1), ("a8b", 1), ("a64", 1), ("base2", 1), ("a16", 5)],
        [("a8b", 1), ("a64", 1)],
    ]
    ours = lora_runner(model, config, runtime, requests, block_size=16, num_blocks=32).run(seqs, schedule)
    for name, logits in ours.items():
        ref = peft_logits(peft_model, which[name], seqs[name][:logits.shape[0]])
        torch.testing.assert_close(logits, ref, atol=DEFAULT_MODEL_ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    # the adapters really change the output (a broken pool would pass the base rows only)
    base = peft_logits(peft_model, None, seqs["a8"][:9])
    assert (ours["a8"] - base).abs().max() > 0.1
    for req in requests.values():
        runtime.release(req, finished=True)
    assert runtime.pool.num_used_pages == sum(ADAPTERS[k][1] for k in ADAPTERS)  # resident, unpinned
    assert all(runtime.pool.pin_count(k) == 0 for k in runtime.pool.resident)


@pytest.mark.parametrize("family", ["qwen2_qkv_bias", "mistral_sliding_window"])
def test_tiny_families_match_peft(family, tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]()).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "base")
    peft_model, model, config, runtime, _ = build_setup(tmp_path / "base", tmp_path, num_pages=100)
    gen = torch.Generator().manual_seed(1)
    which = {"x": "r8-all", "y": None, "z": "r64-all", "w": "r16-rslora"}
    seqs = {k: torch.randint(0, config.vocab_size, (9,), generator=gen).tolist() for k in which}
    requests = make_requests(runtime, seqs, which)
    ours = lora_runner(model, config, runtime, requests).run(
        seqs, [[("x", 5), ("y", 4), ("z", 6)], [("x", 1), ("y", 1), ("z", 1), ("w", 9)]])
    for name, logits in ours.items():
        ref = peft_logits(peft_model, which[name], seqs[name][:logits.shape[0]])
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_rank_and_alpha_patterns_match_peft(tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama_gqa"]()).eval()
    hf.save_pretrained(tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    peft_model = add_random_adapter(hf, "patterned", r=8, alpha=16, target_modules=ALL, seed=3,
                                                 rank_pattern={"down_proj": 4, "q_proj": 12},
                                                 alpha_pattern={"v_proj": 3.0})
    folder = save_adapter(peft_model, "patterned", tmp_path / "peft")
    model, config = load_model(tmp_path / "base", torch.float32)
    runtime = LoRARuntime(model, config, torch.float32, torch.device("cpu"), max_lora_rank=16, num_pages=40,
                          max_cpu_loras=2)
    info = runtime.register_adapter("patterned", 5, 1, str(folder))
    assert info["rank"] == 12
    req = Request("p", list(range(3, 14)), SamplingParams(), adapter_id=5, adapter_version=1)
    runtime.add_request(req)
    assert runtime.admit(req)
    ours = lora_runner(model, config, runtime, {"p": req}).run({"p": req.prompt_token_ids}, [[("p", 11)]])["p"]
    torch.testing.assert_close(ours, peft_logits(peft_model, "patterned", req.prompt_token_ids), atol=ATOL, rtol=0)
