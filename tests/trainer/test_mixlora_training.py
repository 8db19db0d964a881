"""MixLoRA jobs in the batched trainer: gradients (load-balance loss included) equal the job's alone and an
independent float64 reference; checkpointing, chunking and quantized bases; the trained adapter reloads in the
server with the trainer's logits and loads in the `mixlora` package with the same logits."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from loraplex.adapters.mixlora import (
    MixLoRAWeights,
    aux_loss_reference,
    ffn_reference,
    write_mixlora,
)
from loraplex.adapters.runtime import LoRARuntime
from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.loader import load_model
from loraplex.trainer.batch import IGNORE_INDEX, num_targets
from loraplex.trainer.checkpoint import write_adapter
from loraplex.trainer.job import Hyperparams, TrainingJob
from loraplex.trainer.lora_layers import LoRASpec, MixLoRASpec, make_spec
from loraplex.trainer.multi_job import MultiJobTrainer
from tests.adapters.test_lora_parity import lora_runner
from tests.trainer.test_multi_job import random_sequences, tiny_dir  # noqa: F401 - the fixture

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECS = {
    "topk": MixLoRASpec(r=4, alpha=8, num_experts=4, top_k=2, router_aux_loss_coef=0.05),
    "dynamic": MixLoRASpec(r=2, alpha=4, num_experts=3, routing_strategy="mixlora-dynamic", top_p=0.7,
                           target_modules=("q_proj", "v_proj", "up_proj", "down_proj"), expert_r=3, expert_alpha=6,
                           use_rslora=True, router_aux_loss_coef=0.02),
    "lora": LoRASpec(r=4, alpha=8, target_modules=ALL),
}


def make_job(name: str, config, data, **hp) -> TrainingJob:
    seed = list(SPECS).index(name) + 1
    job = TrainingJob(name, SPECS[name], Hyperparams(**({"batch_size": 4, "micro_batch_size": 2, "seed": seed} | hp)),
                      data, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero: give it values so every gradient is non-trivial
        for name_, p in job.lora.named_parameters():
            if name_.startswith(("b.", "eb.")):
                p.normal_(0, 0.1, generator=gen)
            if name_.startswith("router."):
                p.normal_(0, 0.5, generator=gen)  # decisive routing, away from ties
    return job


def grads(job: TrainingJob) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in job.lora.named_parameters()}


def reference_weights(job: TrainingJob, dtype=torch.float64, leaves: dict | None = None) -> MixLoRAWeights:
    """The job's adapter as MixLoRAWeights (scales folded) over `leaves` (name -> tensor) or copies of its params."""
    spec, lora = job.spec, job.lora
    p = leaves if leaves is not None else {n: t.detach().to(dtype) for n, t in lora.named_parameters()}
    attention = {(int(k[1:].split("_", 1)[0]), k.split("_", 1)[1]): (p[f"a.{k}"], p[f"b.{k}"] * spec.scale)
                 for k in lora.a}
    router = {int(k[1:]): p[f"router.{k}"] for k in lora.router}
    experts = {(int(k[1:].split("_", 1)[0]), k.split("_", 1)[1]): (p[f"ea.{k}"], p[f"eb.{k}"] * spec.expert_scale)
               for k in lora.ea}
    return MixLoRAWeights(spec.mixlora_config(), attention, router, experts)


class Reference:
    """transformers' Llama with a MixLoRA's attention LoRA hooked in and ffn_reference as every FFN; collects
    each call's router logits (for aux_loss_reference)."""

    def __init__(self, folder, dtype=torch.float64):
        self.hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.weights: MixLoRAWeights | None = None
        self.router_logits: list[torch.Tensor] = []
        for layer, decoder in enumerate(self.hf.model.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(decoder.self_attn, proj).register_forward_hook(self._hook(layer, proj))
            decoder.mlp.forward = self._mlp(layer, decoder.mlp)

    def _hook(self, layer, proj):
        def hook(module, args, out):
            pair = self.weights.attention.get((layer, proj)) if self.weights is not None else None
            return out if pair is None else out + args[0] @ pair[0].T.to(out.dtype) @ pair[1].T.to(out.dtype)
        return hook

    def _mlp(self, layer, mlp):
        def forward(x):
            out, logits = ffn_reference(self.weights, layer, x.reshape(-1, x.shape[-1]), mlp.gate_proj.weight,
                                        mlp.up_proj.weight, mlp.down_proj.weight)
            self.router_logits.append(logits)
            return out.reshape(x.shape)
        return forward

    def loss(self, weights: MixLoRAWeights, sequences, norm: int, accumulation: int, coef: float) -> torch.Tensor:
        """SFT loss of one micro-batch (summed token cross-entropy / the optimizer step's targets) plus the
        load-balance loss over all its tokens and layers / the step's micro-batches, as MoE-PEFT."""
        self.weights, self.router_logits = weights, []
        total = 0.0
        for seq in sequences:
            start = 0
            for n in seq.seq_lens:
                ids = torch.tensor([seq.input_ids[start:start + n]])
                labels = torch.tensor(seq.labels[start + 1:start + n])
                logits = self.hf(input_ids=ids).logits[0, :-1]
                total = total + F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
                start += n
        aux = aux_loss_reference(weights.config, torch.cat(self.router_logits), coef)
        return total / norm + aux / accumulation

    def logits(self, weights: MixLoRAWeights, ids: list[int]) -> torch.Tensor:
        self.weights = weights
        with torch.no_grad():
            return self.hf(input_ids=torch.tensor([ids])).logits[0]


def test_mixed_step_gradients_equal_alone_and_the_float64_reference(tiny_dir):  # noqa: F811
    model, config = load_model(tiny_dir, torch.float32)
    data = {name: random_sequences(8, seed=40 + i) for i, name in enumerate(SPECS)}
    batched = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=3)
    jobs = {name: make_job(name, config, data[name]) for name in SPECS}
    initial = {name: {n: p.detach().clone() for n, p in job.lora.named_parameters()} for name, job in jobs.items()}
    for job in jobs.values():
        batched.add_job(job)
    reports = batched.step()  # micro-batch 1 of 2: gradients accumulate
    assert not any(r.optimizer_step for r in reports)
    ref = Reference(tiny_dir)
    for name in ("topk", "dynamic"):
        job = jobs[name]
        # alone
        alone_model, _ = load_model(tiny_dir, torch.float32)
        alone = MultiJobTrainer(alone_model, config, torch.float32, torch.device("cpu"), max_jobs=1)
        solo = make_job(name, config, data[name])
        alone.add_job(solo)
        alone.step()
        got, want_alone = grads(job), grads(solo)
        # the float64 reference from the same starting weights, on the same micro-batch
        leaves = {n: t.double().requires_grad_() for n, t in initial[name].items()}
        micro = job.optimizer_batch(0)[:2]
        loss = ref.loss(reference_weights(job, leaves=leaves), micro, num_targets(job.optimizer_batch(0)),
                        accumulation=2, coef=job.spec.router_aux_loss_coef)
        loss.backward()
        for k in got:
            assert got[k].abs().max() > 0, (name, k)
            torch.testing.assert_close(got[k], want_alone[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
            torch.testing.assert_close(got[k], leaves[k].grad.float(), atol=1e-5, rtol=1e-4,
                                       msg=lambda m, k=k, name=name: f"{name} {k} vs float64: {m}")


def test_aux_loss_alone_is_the_reference_and_balanced_routing_gives_c_times_k(tiny_dir):  # noqa: F811
    """With a zero router every expert is equally likely: MoE-PEFT's loss is then exactly coef * top_k; and the
    aux loss is what the step reports."""
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"))
    job = TrainingJob("z", MixLoRASpec(r=2, alpha=4, num_experts=4, top_k=2, router_aux_loss_coef=0.01),
                      Hyperparams(batch_size=2, micro_batch_size=2), random_sequences(2, seed=1), config)
    with torch.no_grad():
        for w in job.lora.router.values():
            w.zero_()
    trainer.add_job(job)
    trainer.step()
    assert job.last_metrics["router_aux_loss"] == pytest.approx(0.01 * 2, rel=1e-6)


def test_gradient_checkpointing_and_small_chunks_give_the_same_gradients(tiny_dir):  # noqa: F811
    """Checkpointing recomputes each layer (routing included) and gives identical gradients, the aux loss's too.
    Cut into chunks of a sequence or two, a step gives the same gradients when the aux loss is off (with it, the
    loss is per chunk by design: trainer/mixlora_train.py)."""
    def run(checkpointing: bool, chunk_tokens: int, coef: float):
        model, config = load_model(tiny_dir, torch.float32)
        trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2,
                                  gradient_checkpointing=checkpointing, chunk_tokens=chunk_tokens)
        jobs = [make_job(n, config, random_sequences(4, seed=5)) for n in ("topk", "lora")]
        jobs[0].spec = jobs[0].lora.spec = dataclasses.replace(SPECS["topk"], router_aux_loss_coef=coef)
        for job in jobs:
            trainer.add_job(job)
        trainer.step()
        return [grads(j) for j in jobs]

    for want, got in ((run(False, 10_000, 0.05), run(True, 10_000, 0.05)), (run(False, 10_000, 0.0),
                                                                          run(True, 20, 0.0))):
        for w, g in zip(want, got):
            for k in w:
                torch.testing.assert_close(g[k], w[k], atol=1e-6, rtol=1e-5)


def test_mixlora_on_a_quantized_base(tiny_dir):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    from loraplex.engine.quant import QuantConfig, quantize_linears
    model, config = load_model(tiny_dir, torch.float32)
    quantize_linears(model, QuantConfig("nf4"), torch.float32, torch.device("cpu"))
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2)
    jobs = [make_job(n, config, random_sequences(4, seed=6)) for n in ("topk", "lora")]
    for job in jobs:
        trainer.add_job(job)
    assert all(r.loss > 0 for r in trainer.step())
    for name, g in grads(jobs[0]).items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())


def test_trained_mixlora_serves_with_the_trainers_logits_and_loads_in_the_mixlora_package(tiny_dir, tmp_path):  # noqa: F811
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2)
    spec = make_spec({"type": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2,
                      "expert_lora": {"r": 4, "lora_alpha": 8}})
    data = random_sequences(8, seed=7)
    job = TrainingJob("t", spec, Hyperparams(n_epochs=3, batch_size=4, micro_batch_size=4, learning_rate=2e-2),
                      data, config)
    plain = TrainingJob("p", LoRASpec(r=4, alpha=8), Hyperparams(n_epochs=3, batch_size=4, micro_batch_size=4),
                        random_sequences(8, seed=8), config)
    trainer.add_job(job)
    trainer.add_job(plain)
    first = trainer.evaluate([(job, data)])[0]["loss"]
    while trainer.has_work:
        trainer.step()
    assert trainer.evaluate([(job, data)])[0]["loss"] < first
    folder = tmp_path / "trained"
    write_adapter(folder, job, "tiny")
    raw = json.loads((folder / "adapter_config.json").read_text())
    assert raw["peft_type"] == "MIXLORA" and raw["num_experts"] == 4 and isinstance(raw["lora_alpha"], int)
    # served: a fresh model with the runtime; logits equal the float64 reference of the trained weights
    served_model, _ = load_model(tiny_dir, torch.float32)
    runtime = LoRARuntime(served_model, config, torch.float32, torch.device("cpu"), max_lora_rank=8, num_pages=40,
                          max_cpu_loras=2, max_mixlora_adapters=2, max_mixlora_experts=8)
    runtime.register_adapter("t", 1, 1, str(folder))
    ids = data[0].input_ids[:10]
    req = Request("r", ids, SamplingParams(), adapter_id=1, adapter_version=1)
    runtime.add_request(req)
    assert runtime.admit(req)
    served = lora_runner(served_model, config, runtime, {"r": req}).run({"r": ids}, [[("r", 10)]])["r"]
    ref = Reference(tiny_dir)
    want = ref.logits(reference_weights(job), ids).float()
    torch.testing.assert_close(served, want, atol=1e-4, rtol=0)
    # exported for MoE-PEFT's loaders (.bin) and loaded by the mixlora package into transformers
    pytest.importorskip("mixlora")
    from mixlora.model import inject_adapter_in_model, load_adapter_weights
    export = write_mixlora(tmp_path / "moe-peft", spec.mixlora_config("tiny"), job.lora.peft_state_dict(),
                           write_bin=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    mix_config, weights = load_adapter_weights(str(export), device="cpu", dtype=torch.float32)
    inject_adapter_in_model(hf, mix_config, weights)
    for module in hf.modules():
        for moe in getattr(module, "mixlora_moes", {}).values():
            for expert in moe.experts_.values():
                expert.eval()
    hf.eval()  # the attention LoraLinears came after from_pretrained's eval(): their dropout would be on
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(served, theirs, atol=1e-4, rtol=0)
