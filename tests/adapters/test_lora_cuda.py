"""LoRA on CUDA (Triton shrink/expand inside the model) against peft on the CPU, and the engine's
greedy decoding with mixed adapters on CUDA."""
from __future__ import annotations

import pytest
import torch
import transformers

from loraplex.adapters.runtime import create_lora_runtime
from loraplex.adapters.synthetic import write_random_peft
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.llm_engine import LLMEngine, _read_model_config
from tests.adapters.test_lora_engine import run
from tests.adapters.test_lora_parity import build_setup, lora_runner, make_requests, peft_logits
from tests.engine.test_cuda import no_tf32, tiny_model_dir  # noqa: F401 - fixtures
from tests.engine.test_models import TINY_CONFIGS, randomize

pytestmark = pytest.mark.cuda


def test_cuda_mixed_adapter_batch_matches_peft(tmp_path, no_tf32):  # noqa: F811
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["qwen2_qkv_bias"]()).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "base")
    peft_model, model, config, runtime, _ = build_setup(tmp_path / "base", tmp_path, device="cuda")
    assert "triton" in runtime.state.apply.__module__
    gen = torch.Generator().manual_seed(1)
    which = {"x": "r8-all", "y": None, "z": "r64-all", "w": "r16-rslora", "v": "r4-attn"}
    seqs = {k: torch.randint(0, config.vocab_size, (9,), generator=gen).tolist() for k in which}
    requests = make_requests(runtime, seqs, which)
    ours = lora_runner(model, config, runtime, requests, device="cuda").run(
        seqs, [[("x", 5), ("y", 4), ("z", 6)], [("x", 1), ("y", 1), ("z", 1), ("w", 9), ("v", 9)]])
    for name, logits in ours.items():
        ref = peft_logits(peft_model, which[name], seqs[name][:logits.shape[0]])
        assert (logits.cpu() - ref).abs().max() <= 1e-3, name


def test_cuda_engine_greedy_alone_equals_mixed(tiny_model_dir, tmp_path):  # noqa: F811
    config = _read_model_config(str(tiny_model_dir))
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), device="cuda", dtype="float32",
                                                   max_model_len=256, max_num_seqs=16, enable_lora=True,
                                                   max_lora_rank=16, lora_pool_pages=65),
                                        hook_factory=create_lora_runtime)
    for i in range(3):
        engine.adapter_hook.register_adapter(f"a{i}", i + 1, 1, str(write_random_peft(
            tmp_path / f"a{i}", config, r=8 * (i % 2 + 1), seed=i, std=0.3, target_modules=("q_proj", "v_proj", "up_proj"))))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    keys = [None, (1, 1), (2, 1), (3, 1)]

    prompts = [list(range(3 + j, 12 + 2 * j)) for j in range(2)]
    alone = {f"{k}-{j}": run(engine, {"x": (prompts[j], params, k)})["x"] for k in keys for j in range(2)}
    mixed = run(engine, {f"{k}-{j}": (prompts[j], params, k) for j in range(2) for k in keys})
    assert mixed == alone and len({tuple(v) for v in alone.values()}) > 2
