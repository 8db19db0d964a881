"""The batched multi-job training step: each job's gradients equal training it alone and equal peft's on
the same data; optimizer steps, accumulation, schedule, checkpointing and learning."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
import transformers

from loraplex.engine.loader import load_model
from loraplex.trainer.batch import (
    IGNORE_INDEX,
    build_training_batch,
    num_targets,
    plan_chunks,
)
from loraplex.trainer.data import PackedSequence
from loraplex.trainer.job import Hyperparams, TrainingJob, cosine_with_warmup
from loraplex.trainer.lora_layers import LoRASpec
from loraplex.trainer.multi_job import MultiJobTrainer

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECS = {
    "qv-r4": LoRASpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
    "all-r8-rslora": LoRASpec(r=8, alpha=32, target_modules=ALL, use_rslora=True),
    "od-r2-dropout": LoRASpec(r=2, alpha=4, dropout=0.2, target_modules=("o_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-train")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():  # wider than the default init: the frozen lm_head and norm bound the logits
        p.data.normal_(0, 0.15)
    model.save_pretrained(path)
    return path


def random_sequences(n: int, seed: int, vocab: int = 97) -> list[PackedSequence]:
    """Examples with masked prompts; every third one packs two examples into one row."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lens = [rng.randint(5, 14)] + ([rng.randint(4, 9)] if i % 3 == 0 else [])
        ids, labels = [], []
        for length in lens:
            part = [rng.randrange(vocab) for _ in range(length)]
            prompt = rng.randint(1, length - 2)
            ids += part
            labels += [IGNORE_INDEX] * prompt + part[prompt:]
        out.append(PackedSequence(input_ids=ids, labels=labels, seq_lens=lens))
    return out


def make_job(name: str, model_config, data, **hp) -> TrainingJob:
    seed = list(SPECS).index(name) + 1
    job = TrainingJob(name, SPECS[name], Hyperparams(**({"batch_size": 4, "micro_batch_size": 2, "seed": seed} | hp)),
                      data, model_config)
    with torch.no_grad():  # B starts at zero (as peft): give it values so A's gradients are not trivially zero
        for b in job.lora.b.values():
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return job


def grads(job: TrainingJob) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in job.lora.named_parameters()}


def test_batched_step_gives_each_job_its_alone_gradients(tiny_dir):
    model, config = load_model(tiny_dir, torch.float32)
    data = {name: random_sequences(8, seed=i) for i, name in enumerate(SPECS)}
    batched = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=3)
    jobs = {name: make_job(name, config, data[name]) for name in SPECS}
    for job in jobs.values():
        batched.add_job(job)
    reports = batched.step()  # micro-batch 1 of 2: gradients accumulate, no optimizer step yet
    assert [r.job_id for r in reports] == list(SPECS) and not any(r.optimizer_step for r in reports)
    for name in SPECS:
        alone_model, _ = load_model(tiny_dir, torch.float32)
        alone = MultiJobTrainer(alone_model, config, torch.float32, torch.device("cpu"), max_jobs=1)
        job = make_job(name, config, data[name])
        alone.add_job(job)
        alone.step()
        want, got = grads(job), grads(jobs[name])
        assert want.keys() == got.keys()
        for k in want:
            assert want[k].abs().max() > 0, k
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


def test_gradients_match_peft(tiny_dir):
    peft = pytest.importorskip("peft")
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2)
    names = ["qv-r4", "all-r8-rslora"]  # no dropout: peft draws its masks from another stream
    data = {name: random_sequences(8, seed=10 + i) for i, name in enumerate(names)}
    jobs = {name: make_job(name, config, data[name]) for name in names}
    for job in jobs.values():
        trainer.add_job(job)
    initial = {name: job.lora.peft_state_dict() for name, job in jobs.items()}
    micro = {name: job.optimizer_batch(0)[:2] for name, job in jobs.items()}
    norms = {name: num_targets(job.optimizer_batch(0)) for name, job in jobs.items()}
    trainer.step()
    for name in names:
        spec = SPECS[name]
        hf = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        lora = peft.get_peft_model(hf, peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                       target_modules=list(spec.target_modules),
                                                       use_rslora=spec.use_rslora))
        state = {k.replace(".weight", ".default.weight"): v for k, v in initial[name].items()}
        missing = set(state) - set(lora.state_dict())
        assert not missing, sorted(missing)[:3]
        lora.load_state_dict(state, strict=False)
        loss = 0.0
        for seq in micro[name]:
            start = 0
            for n in seq.seq_lens:
                ids = torch.tensor([seq.input_ids[start:start + n]])
                labels = torch.tensor(seq.labels[start + 1:start + n])
                logits = lora(input_ids=ids).logits[0, :-1]
                loss = loss + F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
                start += n
        (loss / norms[name]).backward()
        ours = grads(jobs[name])
        for pname, p in lora.named_parameters():
            if not p.requires_grad:
                continue
            # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
            parts = pname.split(".")
            layer, module, ab = int(parts[4]), parts[6], parts[7][-1].lower()
            mine = ours[f"{ab}.L{layer}_{module}"]
            torch.testing.assert_close(mine, p.grad, atol=1e-5, rtol=1e-4)


def test_accumulation_optimizer_steps_and_schedule(tiny_dir):
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2)
    a = make_job("qv-r4", config, random_sequences(6, seed=1), n_epochs=2, warmup_ratio=0.25)
    b = make_job("all-r8-rslora", config, random_sequences(3, seed=2), n_epochs=1, batch_size=3, micro_batch_size=3)
    trainer.add_job(a)
    trainer.add_job(b)
    assert (a.total_steps, b.total_steps) == (4, 1)  # ceil(6 / 4) * 2 epochs; ceil(3 / 3) * 1
    before = {k: v.detach().clone() for k, v in a.lora.named_parameters()}
    r1 = {r.job_id: r for r in trainer.step()}
    assert not r1["qv-r4"].optimizer_step and r1["all-r8-rslora"].optimizer_step and r1["all-r8-rslora"].finished
    assert all(torch.equal(before[k], v) for k, v in a.lora.named_parameters())  # only accumulated so far
    steps = 1
    while trainer.has_work:
        reports = trainer.step()
        assert [r.job_id for r in reports] == ["qv-r4"]  # the finished job no longer takes part
        steps += 1
    # optimizer step 0: 2 micro-batches; step 1: the epoch's last 2 sequences in 1 micro-batch; epoch 2 alike
    assert steps == 6 and a.step == 4 and a.is_finished
    assert not all(torch.equal(before[k], v) for k, v in a.lora.named_parameters())
    assert cosine_with_warmup(0, 4, 1, 0.0) == 0.0 and cosine_with_warmup(1, 4, 1, 0.0) == 1.0
    assert cosine_with_warmup(4, 4, 1, 0.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="already training"):
        trainer.add_job(a)
    # the epoch order is a permutation of the data, the same on every call (resume sees the same order)
    seen = [id(s) for step in range(2) for s in a.optimizer_batch(step)]
    assert sorted(seen) == sorted(id(s) for s in a.train)
    assert [id(s) for s in a.optimizer_batch(1)] == [id(s) for s in a.optimizer_batch(1)]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    results = []
    for checkpointing in (False, True):
        model, config = load_model(tiny_dir, torch.float32)
        trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2,
                                  gradient_checkpointing=checkpointing)
        jobs = [make_job(n, config, random_sequences(4, seed=5)) for n in ("qv-r4", "od-r2-dropout")]
        for job in jobs:
            trainer.add_job(job)
        trainer.step()
        results.append([grads(j) for j in jobs])
    for plain, ckpt in zip(*results):
        for k in plain:
            torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_slices_with_inference_in_between_give_the_whole_steps_gradients(tiny_dir, checkpointing):
    """The engine serves decode steps between training slices: cutting a step into chunks of a few
    sequences and blocks of loss rows changes no gradient, and a forward between slices sees the plain
    base model (no job's LoRA leaks into it)."""
    names = list(SPECS)  # the dropout job too: its masks are drawn per sequence, however the step is cut
    data = {name: random_sequences(8, seed=30 + i) for i, name in enumerate(names)}
    results = []
    for chunk_tokens, head_rows in ((10_000, 10_000), (20, 3)):
        model, config = load_model(tiny_dir, torch.float32)
        trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=3,
                                  gradient_checkpointing=checkpointing, chunk_tokens=chunk_tokens,
                                  head_rows=head_rows)
        probe = build_training_batch([random_sequences(2, seed=99)], config, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            plain = model(probe.batch, probe.kv_caches).clone()
        jobs = [make_job(n, config, data[n]) for n in names]
        for job in jobs:
            trainer.add_job(job)
        slices = trainer.step_slices()
        num_slices = 0
        while True:
            try:
                next(slices)
            except StopIteration as stop:
                reports = stop.value
                break
            num_slices += 1
            with torch.no_grad():  # an inference step between two slices
                torch.testing.assert_close(model(probe.batch, probe.kv_caches), plain, atol=0, rtol=0)
        assert [r.job_id for r in reports] == names and all(r.num_targets > 0 for r in reports)
        results.append((num_slices, [r.loss for r in reports], [grads(j) for j in jobs]))
    (whole_slices, whole_loss, whole), (cut_slices, cut_loss, cut) = results
    assert cut_slices > whole_slices  # several chunks and loss blocks
    assert cut_loss == pytest.approx(whole_loss, rel=1e-5)
    for want, got in zip(whole, cut):
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


def test_plan_chunks_keeps_sequences_whole_and_jobs_in_order():
    a, b = random_sequences(5, seed=1), random_sequences(3, seed=2)
    chunks = plan_chunks([a, b], max_tokens=25)
    flat = [(j, k) for chunk in chunks for j, part in enumerate(chunk) for k, _ in part]
    assert flat == [(0, k) for k in range(5)] + [(1, k) for k in range(3)]  # every sequence once, in order
    for chunk in chunks:
        sizes = [len(seq.input_ids) for part in chunk for _, seq in part]
        assert sum(sizes) <= 25 or len(sizes) == 1
    empty = PackedSequence(input_ids=[5], labels=[5], seq_lens=[1])  # nothing to predict: left out
    assert plan_chunks([[empty], []], max_tokens=25) == []


def test_training_lowers_the_loss_and_leaves_the_base_alone(tiny_dir):
    model, config = load_model(tiny_dir, torch.float32)
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"))
    base_state = copy.deepcopy(model.state_dict())
    data = random_sequences(4, seed=3)
    job = TrainingJob("fit", LoRASpec(r=8, alpha=16, target_modules=ALL),
                      Hyperparams(n_epochs=60, batch_size=4, micro_batch_size=4, learning_rate=1e-2), data, config)
    trainer.add_job(job)
    first = trainer.evaluate([(job, data)])[0]["loss"]
    while trainer.has_work:
        trainer.step()
    last = trainer.evaluate([(job, data)])[0]["loss"]
    assert last < 0.8 * first  # (random tokens: this tiny model and peft alike level off near 0.74x)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, base_state[name]), name
    assert all(p.grad is None for p in model.parameters() if not any(p is q for q in job.params))


@pytest.mark.parametrize("method", ["nf4", "int8", "gptq"])
def test_batched_training_on_a_quantized_base(tiny_dir, tmp_path, method):
    """QLoRA: the same batched step runs through every quantized base; the base stays frozen."""
    from loraplex.engine.quant import QuantConfig, quantize_linears
    if method == "gptq":
        from loraplex.engine.quant.gptq import export_gptq
        model, config = load_model(export_gptq(tiny_dir, tmp_path / "gptq", bits=4, group_size=32), torch.float32)
    else:
        pytest.importorskip("bitsandbytes")
        model, config = load_model(tiny_dir, torch.float32)
        quantize_linears(model, QuantConfig(method), torch.float32, torch.device("cpu"))
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=2)
    jobs = [make_job(n, config, random_sequences(4, seed=6)) for n in ("qv-r4", "all-r8-rslora")]
    for job in jobs:
        trainer.add_job(job)
    reports = trainer.step()
    assert all(r.loss > 0 for r in reports)
    for job in jobs:
        for name, g in grads(job).items():
            assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())
