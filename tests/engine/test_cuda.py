"""CUDA path against the CPU reference: model logits vs transformers, and the engine's greedy decoding."""
from __future__ import annotations

import pytest
import torch
import transformers

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.llm_engine import LLMEngine
from tests.engine.test_models import PagedRunner
from tests.serve.fake_engine import build_tokenizer

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():  # wider logits than the default init: fewer near-ties in greedy
        p.data.normal_(0, 0.08)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_cuda_logits_match_transformers(tiny_model_dir):
    from loraplex.engine.loader import load_model
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ours, config = load_model(str(tiny_model_dir), dtype=torch.float32, device="cuda")
    seqs = {"a": list(range(3, 40)), "b": list(range(50, 61))}
    runner = PagedRunner(ours, config, block_size=4, num_blocks=64, device="cuda")
    got = runner.run(seqs, [[("a", 20)], [("a", 17), ("b", 11)]])
    for name, ids in seqs.items():
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert (got[name].cpu() - ref).abs().max() <= 1e-4


def run(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return out


def test_cuda_engine_greedy_matches_cpu_engine(tiny_model_dir):
    prompts = [list(range(5 + i, 30 + 7 * i)) for i in range(6)]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    common = dict(model=str(tiny_model_dir), dtype="float32", max_model_len=256, max_num_seqs=8,
                  max_num_batched_tokens=64, num_gpu_blocks_override=128)
    cpu = run(LLMEngine.from_engine_args(EngineArgs(device="cpu", **common)), prompts, greedy)
    gpu_engine = LLMEngine.from_engine_args(EngineArgs(device="cuda", **common))
    assert gpu_engine.runner.kv_caches[0].k.is_cuda
    assert run(gpu_engine, prompts, greedy) == cpu
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    assert run(gpu_engine, prompts[:1], seeded) == run(gpu_engine, prompts[:1], seeded)
