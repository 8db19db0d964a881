"""Self-distillation towards the base model's distributions: the teacher's top-k are the base model's, the
soft loss matches a float64 reference, an adapter that is still the base gets no gradient from it (token
targets would sharpen it), and soft and plain jobs batched together each get their alone gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers

from loraplex.engine.loader import load_model
from loraplex.trainer.batch import IGNORE_INDEX, sub_sequences
from loraplex.trainer.job import Hyperparams, TrainingJob
from loraplex.trainer.multi_job import MultiJobTrainer, soft_log_likelihood

from .test_multi_job import SPECS, grads, make_job, random_sequences, tiny_dir  # noqa: F401 (fixture)


def test_soft_log_likelihood_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    teacher = torch.softmax(torch.randn(6, 50, generator=g, dtype=torch.float64) * 2, dim=-1)
    top = teacher.topk(5, dim=-1)
    ids, probs = top.indices, top.values.float()
    tail = (1 - top.values.sum(dim=1)).float()
    got = soft_log_likelihood(logits, ids, probs, tail)
    q = torch.softmax(logits.double(), dim=-1)
    inside = (top.values * q.gather(1, ids).log()).sum(dim=1)
    want = inside + (1 - top.values.sum(dim=1)) * (1 - q.gather(1, ids).sum(dim=1)).log()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # a one-hot row is the plain token log-likelihood
    target = torch.tensor([3, 7, 1, 0, 49, 2])
    one_hot = soft_log_likelihood(logits, target[:, None].repeat(1, 5), F.one_hot(torch.zeros(6, dtype=torch.long),
                                                                                    5).float(), torch.zeros(6))
    torch.testing.assert_close(one_hot, -F.cross_entropy(logits, target, reduction="none"))


def test_base_distributions_are_the_base_models(tiny_dir):  # noqa: F811
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), chunk_tokens=40, head_rows=7)
    seqs = random_sequences(5, seed=3)
    soft = trainer.with_base_distributions(seqs, k=8)
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    for seq, out in zip(seqs, soft):
        assert out.input_ids == seq.input_ids and out.labels == seq.labels and out.soft is not None
        rows = []
        with torch.no_grad():
            for ids, labels in sub_sequences(seq):
                p = torch.softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
                rows += [p[i] for i in range(len(ids) - 1) if labels[i + 1] != IGNORE_INDEX]
        want = torch.stack(rows).topk(8, dim=-1)
        torch.testing.assert_close(out.soft.probs, want.values, atol=1e-5, rtol=1e-4)
        assert torch.equal(out.soft.ids, want.indices)
        torch.testing.assert_close(out.soft.tail, 1 - want.values.sum(dim=1), atol=1e-5, rtol=1e-4)


def test_an_adapter_that_is_still_the_base_gets_no_gradient(tiny_dir):  # noqa: F811
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"))
    seqs = random_sequences(8, seed=5)
    soft = trainer.with_base_distributions(seqs, k=16)
    norms = {}
    for kind, data in (("soft", soft), ("tokens", seqs)):
        job = TrainingJob(kind, SPECS["all-r8-rslora"], Hyperparams(batch_size=8, micro_batch_size=4), data, config)
        trainer.add_job(job)  # B = 0: the adapter's model is the base
        assert not trainer.step()[0].optimizer_step
        trainer.remove_job(kind)
        norms[kind] = max(g.abs().max().item() for g in grads(job).values())
    assert norms["soft"] < 1e-6 < 1e-3 < norms["tokens"], norms


def test_soft_and_plain_jobs_batched_get_their_alone_gradients(tiny_dir):  # noqa: F811
    model, config = load_model(tiny_dir, torch.float32)
    teacher = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"))
    data = {"qv-r4": random_sequences(8, seed=1) + teacher.with_base_distributions(random_sequences(8, seed=2), k=6),
            "od-r2-dropout": random_sequences(16, seed=3),
            "all-r8-rslora": teacher.with_base_distributions(random_sequences(16, seed=4), k=4)}
    batched = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=3, chunk_tokens=64)
    jobs = {name: make_job(name, config, data[name], batch_size=16, micro_batch_size=8) for name in data}
    for job in jobs.values():
        batched.add_job(job)
    assert not any(r.optimizer_step for r in batched.step())
    for name in data:
        alone = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=1)
        job = make_job(name, config, data[name], batch_size=16, micro_batch_size=8)
        alone.add_job(job)
        alone.step()
        want, got = grads(job), grads(jobs[name])
        for k in want:
            assert want[k].abs().max() > 0, k
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
