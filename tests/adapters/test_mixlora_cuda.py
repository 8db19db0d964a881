"""MixLoRA on CUDA (the torch paths of adapters/ops/mixlora.py inside the model, no host sync for top-k) against
the float64 reference on the CPU, beside LoRA (Triton) and base rows. Skipped without a CUDA device."""
from __future__ import annotations

import pytest
import torch
import transformers

from loraplex.adapters.mixlora import load_mixlora
from loraplex.adapters.peft import load_adapter
from loraplex.adapters.runtime import LoRARuntime
from loraplex.engine.loader import load_model
from tests.adapters.test_lora_parity import lora_runner, make_requests
from tests.adapters.test_mixlora_serving import ADAPTERS, Float64Reference, _write
from tests.engine.test_cuda import no_tf32  # noqa: F401 - fixture
from tests.engine.test_models import TINY_CONFIGS, randomize

pytestmark = pytest.mark.cuda


def test_cuda_mixed_mixlora_batch_matches_the_float64_reference(tmp_path, no_tf32):  # noqa: F811
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama_gqa"]()).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "base")
    model, config = load_model(tmp_path / "base", torch.float32, device="cuda")
    folders = {name: _write(tmp_path, config, name, seed) for seed, name in enumerate(ADAPTERS)}
    runtime = LoRARuntime(model, config, torch.float32, torch.device("cuda"), max_lora_rank=16, num_pages=200,
                          max_cpu_loras=8, max_mixlora_adapters=4, max_mixlora_experts=8)
    for name, (adapter_id, *_) in ADAPTERS.items():
        runtime.register_adapter(name, adapter_id, 1, str(folders[name]))
    gen = torch.Generator().manual_seed(0)
    which = {"b": None, "k": "topk", "rs": "topk-rslora-experts", "d": "dynamic-t", "l": "lora"}
    seqs = {k: torch.randint(0, config.vocab_size, (9,), generator=gen).tolist() for k in which}
    requests = make_requests(runtime, seqs, which, ADAPTERS)
    ours = lora_runner(model, config, runtime, requests, device="cuda").run(
        seqs, [[("b", 5), ("k", 4), ("rs", 6)], [("b", 1), ("k", 1), ("rs", 1), ("d", 9), ("l", 9)]])
    ref = Float64Reference(tmp_path / "base")
    for name, logits in ours.items():
        folder = folders[which[name]] if which[name] else None
        adapter = None if folder is None else (load_adapter(folder, config, 64, dtype=torch.float64)
                                               if ADAPTERS[which[name]][1] == "lora"
                                               else load_mixlora(folder, config, 64, dtype=torch.float64))
        want = ref.logits(adapter, seqs[name][:logits.shape[0]])
        assert (logits.cpu() - want).abs().max() <= 1e-3, name
