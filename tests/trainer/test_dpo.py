"""DPO in the batched step: loss and gradients equal a float64 reference with an explicit reference model
(transformers + peft for the policy, the plain base for the reference: TRL's sigmoid-loss math); mixed with an
SFT job, each job gets the gradients it gets alone; a pair's four sequences never split across chunks."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
import transformers

from loraplex.engine.loader import load_model
from loraplex.trainer.batch import IGNORE_INDEX, plan_chunks
from loraplex.trainer.data import PackedSequence
from loraplex.trainer.job import Hyperparams, TrainingJob
from loraplex.trainer.lora_layers import LoRASpec
from loraplex.trainer.multi_job import MultiJobTrainer
from loraplex.trainer.objectives import DPO, PreferencePair
from tests.trainer.test_multi_job import grads, random_sequences, tiny_dir  # noqa: F401 (fixture)

SPEC = LoRASpec(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
BETA = 0.3


def random_pairs(n: int, seed: int, vocab: int = 97) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 8))]
        seqs = []
        for _ in range(2):
            out = [rng.randrange(vocab) for _ in range(rng.randint(2, 7))]
            seqs.append(PackedSequence(prompt + out, [IGNORE_INDEX] * len(prompt) + out, [len(prompt) + len(out)]))
        pairs.append(PreferencePair(*seqs))
    return pairs


def dpo_job(config, pairs, seed=3, **hp) -> TrainingJob:
    job = TrainingJob("dpo", SPEC, Hyperparams(**({"batch_size": 4, "micro_batch_size": 2, "seed": seed} | hp)),
                      pairs, config, objective=DPO(BETA))
    with torch.no_grad():  # B starts at zero: give it values so the policy differs from the reference
        for b in job.lora.b.values():
            b.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return job


def sequence_logp(model, seq: PackedSequence) -> torch.Tensor:
    ids = torch.tensor([seq.input_ids])
    labels = torch.tensor(seq.labels[1:])
    logits = model(input_ids=ids).logits[0, :-1]
    keep = labels != IGNORE_INDEX
    return -F.cross_entropy(logits[keep], labels[keep], reduction="sum")


def test_dpo_loss_and_gradients_equal_a_float64_reference(tiny_dir):  # noqa: F811
    peft = pytest.importorskip("peft")
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=1)
    job = dpo_job(config, random_pairs(8, seed=1))
    initial = job.lora.peft_state_dict()
    micro = job.optimizer_batch(0)[:2]  # the first micro-batch: 2 of the optimizer step's 4 pairs
    trainer.add_job(job)
    (report,) = trainer.step()
    assert not report.optimizer_step  # gradients stay accumulated for the comparison

    base = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    reference = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    policy = peft.get_peft_model(base, peft.LoraConfig(r=SPEC.r, lora_alpha=SPEC.alpha, lora_dropout=0.0,
                                                       target_modules=list(SPEC.target_modules)))
    policy.load_state_dict({k.replace(".weight", ".default.weight"): v.double() for k, v in initial.items()},
                           strict=False)
    loss = torch.zeros((), dtype=torch.float64)
    margins = []
    for pair in micro:
        with torch.no_grad():
            ref_c, ref_r = sequence_logp(reference, pair.chosen), sequence_logp(reference, pair.rejected)
        pol_c, pol_r = sequence_logp(policy, pair.chosen), sequence_logp(policy, pair.rejected)
        logits = (pol_c - pol_r) - (ref_c - ref_r)
        loss = loss - F.logsigmoid(BETA * logits)
        margins.append(float(BETA * logits.detach()))
    (loss / 4).backward()  # normalised by the optimizer step's 4 pairs, as the micro-batches accumulate
    assert report.loss == pytest.approx(float(loss) / 2, abs=1e-5)  # the micro-batch's mean over its 2 pairs
    ours = grads(job)
    compared = 0
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        layer, module, ab = int(parts[4]), parts[6], parts[7][-1].lower()
        mine = ours[f"{ab}.L{layer}_{module}"].double()
        assert p.grad.abs().max() > 1e-4
        torch.testing.assert_close(mine, p.grad, atol=1e-5, rtol=1e-4)
        compared += 1
    assert compared == 2 * 2 * len(SPEC.target_modules)


def test_dpo_and_sft_batched_give_each_job_its_alone_gradients(tiny_dir):  # noqa: F811
    from tests.trainer.test_multi_job import make_job
    model, config = load_model(tiny_dir, torch.float32)
    sft_data, pairs = random_sequences(8, seed=5), random_pairs(8, seed=6)
    # small chunks: the step is cut into several, and a pair's four sequences must still share one
    batched = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2, chunk_tokens=40)
    jobs = {"dpo": dpo_job(config, pairs), "sft": make_job("qv-r4", config, sft_data)}
    for job in jobs.values():
        batched.add_job(job)
    reports = batched.step()
    assert sorted(r.job_id for r in reports) == ["dpo", "qv-r4"]
    for name, make in (("dpo", lambda c: dpo_job(c, pairs)), ("sft", lambda c: make_job("qv-r4", c, sft_data))):
        alone_model, _ = load_model(tiny_dir, torch.float32)
        alone = MultiJobTrainer(alone_model, config, torch.float32, torch.device("cpu"), max_jobs=1)
        job = make(config)
        alone.add_job(job)
        alone.step()
        want, got = grads(job), grads(jobs[name])
        for k in want:
            assert want[k].abs().max() > 0, k
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


def test_a_pair_never_spans_chunks():
    pairs = random_pairs(6, seed=2)
    seqs, _ = DPO().expand(pairs)
    chunks = plan_chunks([seqs], max_tokens=30, groups=[4])
    assert len(chunks) > 2
    seen = []
    for chunk in chunks:
        ordinals = [k for k, _ in chunk[0]]
        assert len(ordinals) % 4 == 0 and all(o % 4 == i % 4 for i, o in enumerate(ordinals))
        seen += ordinals
    assert seen == list(range(len(seqs)))


def test_dpo_training_widens_the_margin(tiny_dir):  # noqa: F811
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=1)
    pairs = random_pairs(8, seed=9)
    job = dpo_job(config, pairs, n_epochs=20, micro_batch_size=4, learning_rate=2e-2)
    trainer.add_job(job)
    first = trainer.evaluate([(job, pairs)])[0]
    while trainer.has_work:
        trainer.step()
    last = trainer.evaluate([(job, pairs)])[0]
    assert last["margin"] > first["margin"] + 0.5 and last["loss"] < first["loss"]
    assert last["accuracy"] == 1.0
