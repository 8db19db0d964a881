"""Weights and KV cache on transparent huge pages (engine/hugepages.py): the same values, the same tokens, the memory
really backed by 2 MiB pages where the kernel offers them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.engine import hugepages
from loraplex.engine.hugepages import (
    huge_page_bytes,
    huge_pages_possible,
    move_to_huge_pages,
    thp_mode,
)
from loraplex.engine.quant import module_weight_bytes

needs_thp = pytest.mark.skipif(not huge_pages_possible(), reason=f"transparent huge pages are {thp_mode()} here")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4096, 256)
        self.proj = nn.Linear(256, 1024)
        self.norm = nn.LayerNorm(256)  # small: stays where it is
        self.head = nn.Linear(256, 4096, bias=False)
        self.head.weight = self.embed.weight  # tied: one storage
        self.register_buffer("table", torch.arange(100_000, dtype=torch.int64)[::2])  # a strided view of a storage


@needs_thp
def test_move_keeps_values_views_and_ties_and_uses_huge_pages():
    torch.manual_seed(0)
    model = Tied()
    before = {name: t.detach().clone() for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    norm_ptr = model.norm.weight.data_ptr()
    weight_bytes = module_weight_bytes(model)  # counted by the memory covered: the same once they share a mapping
    x = torch.randint(0, 4096, (3, 5))
    want = model.head(model.proj(model.embed(x))[..., :256]).sum()
    moved = move_to_huge_pages(model)
    assert moved == (4096 * 256 + 1024 * 256) * 4 + 100_000 * 8  # the tied pair once; the bias is under the threshold
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.equal(t, before[name]), name
    assert model.head.weight is model.embed.weight
    assert module_weight_bytes(model) == weight_bytes
    assert model.table.stride() == (2,) and model.table.shape == (50_000,)
    assert model.norm.weight.data_ptr() == norm_ptr  # under the size threshold: not moved
    assert model.embed.weight.data_ptr() % hugepages.ALIGN == 0
    assert huge_page_bytes(model.embed.weight) >= hugepages.HUGE_PAGE
    assert torch.equal(model.head(model.proj(model.embed(x))[..., :256]).sum(), want)
    model.proj.weight.requires_grad_(True)  # still a working leaf: gradients reach it
    (model.proj(torch.ones(2, 256)).sum()).backward()
    assert torch.equal(model.proj.weight.grad, torch.full((1024, 256), 2.0))


def test_nothing_moves_without_transparent_huge_pages(monkeypatch):
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "never")
    model = nn.Linear(512, 512)
    ptr = model.weight.data_ptr()
    assert move_to_huge_pages(model) == 0 and model.weight.data_ptr() == ptr


@needs_thp
def test_engine_on_huge_pages_decodes_the_same_tokens(default_model_dir):
    """The default CPU engine (weights and KV cache on huge pages) and one with --no-cpu-huge-pages give the same
    greedy tokens, through the streaming kernels' one-call stack."""
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine

    def run(huge: bool) -> tuple[list[int], LLMEngine]:
        engine = LLMEngine.from_engine_args(EngineArgs(model=str(default_model_dir), dtype="bfloat16",
                                                       cpu_linear="stream", cpu_huge_pages=huge, max_num_seqs=4,
                                                       kv_cache_memory_bytes=64 << 20))
        prompt = engine.tokenizer("The quick brown fox")["input_ids"]
        engine.add_request("r", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens += list(out.token_ids)  # deltas
        return tokens, engine

    plain, plain_engine = run(False)
    huge, huge_engine = run(True)
    assert len(huge) == 24 and huge == plain
    assert huge_engine.memory_bytes["weights"] == plain_engine.memory_bytes["weights"]
    model = huge_engine.runner.model
    assert huge_page_bytes(model.model.embed_tokens.weight) > 0
    assert huge_page_bytes(huge_engine.runner.kv_caches[0].k) > 0
    assert huge_page_bytes(plain_engine.runner.kv_caches[0].k) == 0


@needs_thp
def test_a_fresh_zero_cache_moves_without_a_copy_and_is_backed_as_it_is_written():
    from loraplex.engine.hugepages import move_to_huge_pages_tensors
    k, v = torch.zeros(4 << 20), torch.zeros(4 << 20)  # 16 MiB each
    assert move_to_huge_pages_tensors([k, v], "KV cache", zeros=True) == 2 * (16 << 20)
    assert not k.any() and not v.any() and k.data_ptr() != v.data_ptr()
    k.fill_(1.0)
    assert huge_page_bytes(k) >= 8 * hugepages.HUGE_PAGE and not v.any()


@needs_thp
def test_the_lora_pool_moves_too_and_adapter_tokens_stay(tmp_path, default_model_dir):
    """The adapter pool (read page by page in every decode step) joins the weights on huge pages, and an adapter's
    greedy tokens are the same as with the pool on normal pages."""
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.core.sampling_params import SamplingParams
    from tests.adapters.test_lora_engine import lora_engine, run

    folder = None
    results = {}
    for huge in (False, True):
        engine = lora_engine(default_model_dir, dtype="bfloat16", cpu_linear="stream", cpu_huge_pages=huge)
        folder = folder or write_random_peft(tmp_path / "a", engine.model_config, r=8, seed=0, std=0.05,
                                             target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"))
        engine.adapter_hook.register_adapter("a", 1, 1, str(folder))
        prompt = engine.tokenizer("The quick brown fox")["input_ids"]
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        results[huge] = run(engine, {"lora": (prompt, params, (1, 1)), "base": (prompt, params, None)})
        if huge:
            assert huge_page_bytes(engine.adapter_hook.weights.a[0]["q_proj"]) > 0
    assert results[True] == results[False] and results[True]["lora"] != results[True]["base"]
