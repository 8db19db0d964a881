"""DoRA jobs (lora.use_dora): the magnitude starts at the base weight's row norms as in PEFT, gradients of A, B and
the magnitude equal peft's on the same weights while batched with a plain LoRA job, and the trained adapter is
served (type dora) with peft's logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from loraplex.adapters.runtime import LoRARuntime
from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.loader import load_model
from loraplex.trainer.batch import IGNORE_INDEX, num_targets
from loraplex.trainer.job import Hyperparams, TrainingJob
from loraplex.trainer.lora_layers import LoRASpec
from loraplex.trainer.multi_job import MultiJobTrainer
from tests.adapters.test_lora_parity import lora_runner
from tests.trainer.test_multi_job import grads, random_sequences, tiny_dir  # noqa: F401 - tiny_dir is a fixture

SPECS = {
    "dora-qv": LoRASpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"), use_dora=True),
    "dora-all": LoRASpec(r=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"), use_dora=True),
    "plain": LoRASpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
}


def make_job(name, config, data):
    seed = list(SPECS).index(name) + 1
    job = TrainingJob(name, SPECS[name], Hyperparams(batch_size=4, micro_batch_size=2, seed=seed, learning_rate=1e-2),
                      data, config)
    with torch.no_grad():
        for b in job.lora.b.values():
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return job


def peft_model_of(tiny_dir, spec, state):  # noqa: F811 - the fixture's value
    import peft
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model = peft.get_peft_model(hf, peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                    target_modules=list(spec.target_modules),
                                                    use_dora=spec.use_dora))
    renamed = {}
    for k, v in state.items():
        if k.endswith("lora_magnitude_vector"):
            renamed[k + ".default.weight"] = v
        else:
            renamed[k.replace(".weight", ".default.weight")] = v
    missing = set(renamed) - set(model.state_dict())
    assert not missing, sorted(missing)[:3]
    model.load_state_dict(renamed, strict=False)
    return model


def test_dora_gradients_match_peft_batched_with_plain_lora(tiny_dir):  # noqa: F811
    pytest.importorskip("peft")
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=3)
    data = {name: random_sequences(8, seed=20 + i) for i, name in enumerate(SPECS)}
    jobs = {name: make_job(name, config, data[name]) for name in SPECS}
    for job in jobs.values():
        trainer.add_job(job)
    micro = {name: job.optimizer_batch(0)[:2] for name, job in jobs.items()}
    norms = {name: num_targets(job.optimizer_batch(0)) for name, job in jobs.items()}
    trainer.step()  # the first forward sets the magnitudes: the snapshot after it is what peft starts from
    for name in ("dora-qv", "dora-all"):
        job = jobs[name]
        state = job.lora.peft_state_dict()
        mags = [v for k, v in state.items() if k.endswith("lora_magnitude_vector")]
        assert mags and all(m.abs().min() > 0 for m in mags)
        reference = peft_model_of(tiny_dir, SPECS[name], state)
        # PEFT's own init of the magnitude is ‖W + s·B·A‖ at its creation (B = 0 there): the base row norms
        fresh = peft_model_of(tiny_dir, SPECS[name], {k: v for k, v in state.items() if "magnitude" not in k})
        hf_w = fresh.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
        torch.testing.assert_close(state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"],
                                   torch.linalg.vector_norm(hf_w, dim=1).detach(), atol=1e-5, rtol=1e-5)
        loss = 0.0
        for seq in micro[name]:
            start = 0
            for n in seq.seq_lens:
                ids = torch.tensor([seq.input_ids[start:start + n]])
                labels = torch.tensor(seq.labels[start + 1:start + n])
                logits = reference(input_ids=ids).logits[0, :-1]
                loss = loss + F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
                start += n
        (loss / norms[name]).backward()
        ours = grads(job)
        checked = 0
        for pname, p in reference.named_parameters():
            if not p.requires_grad:
                continue
            parts = pname.split(".")  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
            layer, module, which = int(parts[4]), parts[6], parts[7]
            mine = ours[{"lora_A": "a", "lora_B": "b", "lora_magnitude_vector": "m"}[which] + f".L{layer}_{module}"]
            torch.testing.assert_close(mine, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=pname: f"{n}: {m}")
            checked += which == "lora_magnitude_vector"
        assert checked == len(mags)


def test_trained_dora_adapter_is_served_with_peft_logits(tiny_dir, tmp_path):  # noqa: F811
    pytest.importorskip("peft")
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=1)
    job = make_job("dora-all", config, random_sequences(8, seed=5))
    trainer.add_job(job)
    losses = []
    for _ in range(8):
        reports = trainer.step()
        losses += [r.loss for r in reports if r.optimizer_step]
    assert losses[-1] < losses[0]
    folder = tmp_path / "dora"
    folder.mkdir()
    from safetensors.torch import save_file
    state = job.lora.peft_state_dict()
    save_file(state, str(folder / "adapter_model.safetensors"))
    import json
    (folder / "adapter_config.json").write_text(json.dumps(SPECS["dora-all"].peft_config()))
    served_model, _ = load_model(tiny_dir, torch.float32)
    runtime = LoRARuntime(served_model, config, torch.float32, torch.device("cpu"), max_lora_rank=16, num_pages=40,
                          max_cpu_loras=2)
    assert runtime.register_adapter("trained", 1, 1, str(folder))["kind"] == "dora"
    ids = [3, 14, 15, 92, 65, 35]
    request = Request("r", ids, SamplingParams(), adapter_id=1, adapter_version=1)
    runtime.add_request(request)
    assert runtime.admit(request)
    ours = lora_runner(served_model, config, runtime, {"r": request}).run({"r": ids}, [[("r", len(ids))]])["r"]
    with torch.no_grad():
        ref = peft_model_of(tiny_dir, SPECS["dora-all"], state)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
