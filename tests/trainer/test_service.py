"""TrainingRuntime, the engine process's side of fine-tuning: jobs from the store train between inference
steps on the served model, report events and checkpoints, write the adapter, fail cleanly, cancel, resume."""
from __future__ import annotations

import json

import pytest
import torch

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.llm_engine import LLMEngine
from loraplex.trainer.job_store import JobStore
from tests.engine.test_cuda import tiny_model_dir  # noqa: F401 - fixture

CHAT = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"code {i}?"},
                                          {"role": "assistant", "content": f"zebra {i}"}]}) for i in range(8))


def make_engine(model_dir, store_dir) -> LLMEngine:
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.trainer.service import create_training_runtime
    args = EngineArgs(model=str(model_dir), max_num_seqs=4, enable_lora=True, max_lora_rank=16, lora_pool_pages=40,
                      enable_training=True, fine_tuning_dir=str(store_dir), max_train_jobs=2)
    return LLMEngine.from_engine_args(args, create_lora_runtime, create_training_runtime)


def submit(store: JobStore, data: str = CHAT, **lora) -> str:
    f = store.add_file(data.encode(), "train.jsonl", "fine-tune")
    job = store.create_job(model="tiny", training_file=f.id, validation_file=None, suffix="t", seed=1,
                           hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 5.0},
                           lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                                 "use_rslora": False, "checkpoint_every": 1, "template": "chatml"} | lora,
                           method={"type": "supervised"})
    store.set_status(job.id, "queued")
    return job.id


def generate(engine, prompt, adapter=None) -> list[int]:
    engine.add_request(f"g{id(prompt)}{adapter}", prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                                          ignore_eos=True), adapter=adapter)
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.token_ids
    return tokens


def test_a_job_trains_beside_inference_and_its_adapter_serves(tiny_model_dir, tmp_path):  # noqa: F811
    engine = make_engine(tiny_model_dir, tmp_path / "ft")
    store = JobStore(tmp_path / "ft")
    job_id = submit(store)
    base_tokens = generate(engine, [5, 6, 7])
    assert engine.call("train_submit", (job_id,)) == "running"
    assert store.get_job(job_id).status == "running"
    steps = 0
    while engine.background.has_work():
        engine.background.run_step()
        steps += 1
        if steps == 3:  # inference in the middle of training is unaffected by it
            assert generate(engine, [5, 6, 7]) == base_tokens
    record = store.get_job(job_id)
    assert record.status == "running" and record.output_path  # the HTTP side publishes it
    events, _ = store.list_events(job_id, limit=100)
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    total = 2 * 4  # 7 training examples (1 held out), batches of 2, 2 epochs
    assert len(metrics) == total and all(m["train_loss"] > 0 for m in metrics)
    assert any("valid_loss" in m for m in metrics)
    checkpoints, _ = store.list_checkpoints(job_id, limit=100)
    assert sorted(c["step_number"] for c in checkpoints) == list(range(1, total))  # the last one is the output
    # publish as the HTTP side would: the engine's adapter hook serves the folder
    engine.call("register_adapter", ("ft", 1, 1, record.output_path))
    tuned = generate(engine, [5, 6, 7], adapter=(1, 1))
    assert len(tuned) == 6
    assert engine.runner.model.model.layers[0].self_attn.q_proj.state.segments == []  # wrappers back to pass-through


def test_bad_data_fails_the_job_and_cancel_stops_one(tiny_model_dir, tmp_path):  # noqa: F811
    engine = make_engine(tiny_model_dir, tmp_path / "ft")
    store = JobStore(tmp_path / "ft")
    bad = submit(store, data=json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    assert engine.call("train_submit", (bad,)) == "failed"
    record = store.get_job(bad)
    assert record.status == "failed" and record.error["code"] == "invalid_training_file"
    good = submit(store)
    engine.call("train_submit", (good,))
    engine.background.run_step()
    assert engine.call("train_cancel", (good,)) == "cancelled"
    assert store.get_job(good).status == "cancelled" and not engine.background.has_work()
    with pytest.raises(ValueError, match="no fine-tuning job"):
        engine.call("train_submit", ("ftjob-missing",))


def test_a_restarted_engine_resumes_running_jobs_from_their_checkpoint(tiny_model_dir, tmp_path):  # noqa: F811
    engine = make_engine(tiny_model_dir, tmp_path / "ft")
    store = JobStore(tmp_path / "ft")
    job_id = submit(store)
    engine.call("train_submit", (job_id,))
    while not store.list_checkpoints(job_id)[0] or store.latest_checkpoint(job_id)["step_number"] < 3:
        engine.background.run_step()
    del engine  # "killed": the job is still running in the store, with checkpoints at steps 1..3
    restarted = make_engine(tiny_model_dir, tmp_path / "ft")  # resumes on start
    job = restarted.background.running[job_id].job
    assert job.step == 3
    while restarted.background.has_work():
        restarted.background.run_step()
    assert store.get_job(job_id).output_path
    events, _ = store.list_events(job_id, limit=100)
    assert any("Resumed from the checkpoint at step 3" in e["message"] for e in events)
    # the resumed run ends with the same adapter as an uninterrupted one
    fresh = make_engine(tiny_model_dir, tmp_path / "ft2")
    store2 = JobStore(tmp_path / "ft2")
    other = submit(store2)
    fresh.call("train_submit", (other,))
    while fresh.background.has_work():
        fresh.background.run_step()
    from safetensors.torch import load_file
    a = load_file(f"{store.get_job(job_id).output_path}/adapter_model.safetensors")
    b = load_file(f"{store2.get_job(other).output_path}/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_early_stopping_publishes_the_adapter_of_the_best_validation_loss(tiny_model_dir, tmp_path):  # noqa: F811
    """Validation losses 2.0, 1.0, 1.5, 1.6 with patience 2: the job stops at step 4 and publishes the weights
    of step 2 (kept in memory and in each checkpoint, so a resumed job keeps them too), not its last ones."""
    from safetensors.torch import load_file

    from loraplex.trainer.checkpoint import load_best_weights
    engine = make_engine(tiny_model_dir, tmp_path / "ft")
    store = JobStore(tmp_path / "ft")
    job_id = submit(store, eval_every=1, early_stopping_patience=2)
    losses, snapshots = iter([2.0, 1.0, 1.5, 1.6]), {}

    def scripted(jobs_and_data):  # evaluate_slices with set losses; records the weights each one saw
        ((job, _),) = jobs_and_data
        snapshots[job.step] = job.lora.peft_state_dict()
        return [{"loss": next(losses)}]
        yield  # a generator, as evaluate_slices is

    engine.background.trainer.evaluate_slices = scripted
    engine.call("train_submit", (job_id,))
    while engine.background.has_work():
        engine.background.run_step()
    assert sorted(snapshots) == [1, 2, 3, 4]
    messages = [e["message"] for e in store.list_events(job_id, limit=100)[0]]
    assert any(m.startswith("Early stopping at step 4") for m in messages)
    assert any("the one of step 2 (validation loss 1.0000)" in m for m in messages)
    published = load_file(f"{store.get_job(job_id).output_path}/adapter_model.safetensors")
    assert published.keys() == snapshots[2].keys()
    assert all(torch.equal(published[k], snapshots[2][k]) for k in published)
    assert any(not torch.equal(published[k], snapshots[4][k]) for k in published)  # the last weights differ
    kept = load_best_weights(store.latest_checkpoint(job_id)["path"])  # step 3's checkpoint keeps step 2's
    assert store.latest_checkpoint(job_id)["step_number"] == 3
    assert all(torch.equal(kept[k], snapshots[2][k]) for k in kept)


def run_to_end(engine) -> None:
    while engine.background.has_work():
        engine.background.run_step()


def test_pause_stops_steps_and_resume_ends_with_the_unpaused_result(tiny_model_dir, tmp_path):  # noqa: F811
    from safetensors.torch import load_file
    engine = make_engine(tiny_model_dir, tmp_path / "ft")
    store = JobStore(tmp_path / "ft")
    job_id = submit(store)
    engine.call("train_submit", (job_id,))
    for _ in range(7):  # into the middle of a batched step: its micro-batch is dropped and runs again
        engine.background.run_step()
    assert engine.background.trainer.in_step == [job_id]
    assert engine.call("train_pause", (job_id,)) == "paused"
    assert store.get_job(job_id).status == "paused" and not engine.background.has_work()
    step = engine.background.paused[job_id].job.step
    with pytest.raises(ValueError, match="only a queued or running job can be paused"):
        engine.call("train_pause", (job_id,))
    assert engine.call("train_resume", (job_id,)) == "running"
    assert engine.background.running[job_id].job.step == step
    run_to_end(engine)
    other_engine = make_engine(tiny_model_dir, tmp_path / "ft2")
    store2 = JobStore(tmp_path / "ft2")
    other = submit(store2)
    other_engine.call("train_submit", (other,))
    run_to_end(other_engine)
    a = load_file(f"{store.get_job(job_id).output_path}/adapter_model.safetensors")
    b = load_file(f"{store2.get_job(other).output_path}/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    messages = [e["message"] for e in store.list_events(job_id, limit=100)[0]]
    assert any(m.startswith("The job was paused at step") for m in messages) and "The job was resumed" in messages


def test_a_job_that_does_not_fit_waits_for_memory(tiny_model_dir, tmp_path):  # noqa: F811
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.trainer.service import create_training_runtime, job_state_bytes
    probe = make_engine(tiny_model_dir, tmp_path / "probe")
    probe_store = JobStore(tmp_path / "probe")
    probe.call("train_submit", (submit(probe_store),))
    one = job_state_bytes(next(iter(probe.background.running.values())).job)
    args = EngineArgs(model=str(tiny_model_dir), max_num_seqs=4, enable_lora=True, max_lora_rank=16,
                      lora_pool_pages=40, enable_training=True, fine_tuning_dir=str(tmp_path / "ft"), max_train_jobs=2,
                      train_memory_bytes=int(1.5 * one))
    engine = LLMEngine.from_engine_args(args, create_lora_runtime, create_training_runtime)
    store = JobStore(tmp_path / "ft")
    first, second = submit(store), submit(store)
    assert engine.call("train_submit", (first,)) == "running"
    assert engine.call("train_submit", (second,)) == "queued"
    assert store.get_job(second).status == "queued"
    assert any(e["message"].startswith("Waiting for memory") for e in store.list_events(second)[0])
    assert engine.call("train_stats", ())["waiting_jobs"] == 1
    while store.get_job(first).output_path is None:
        engine.background.run_step()
        # never both at once: the second starts in the step where the first ends
        assert second not in engine.background.running or store.get_job(first).output_path
    assert store.get_job(second).status == "running"  # admitted the moment the first finished
    run_to_end(engine)
    assert store.get_job(second).output_path


def test_priorities_divide_the_steps_when_jobs_outnumber_the_batch():
    from types import SimpleNamespace

    from loraplex.trainer.multi_job import MultiJobTrainer
    trainer = MultiJobTrainer.__new__(MultiJobTrainer)  # scheduling only: no model needed
    trainer.jobs, trainer._pass_value, trainer.max_jobs = {}, {}, 1
    low = SimpleNamespace(job_id="low", priority=0, is_finished=False)
    high = SimpleNamespace(job_id="high", priority=3, is_finished=False)
    trainer.add_job(low)
    trainer.add_job(high)
    picks = []
    for _ in range(20):
        (job,) = trainer.pick_jobs()
        picks.append(job.job_id)
        trainer._pass_value[job.job_id] += 1.0 / (job.priority + 1)
    assert picks.count("high") == 16 and picks.count("low") == 4  # shares 4:1, as priority + 1
    trainer.max_jobs = 2
    assert {j.job_id for j in trainer.pick_jobs()} == {"low", "high"}  # room for both: both in every step


def test_self_distillation_answers_come_from_the_engines_own_base_rows(tiny_model_dir, tmp_path):  # noqa: F811
    from loraplex.trainer import regularization
    engine = make_engine(tiny_model_dir, tmp_path / "ft")
    store = JobStore(tmp_path / "ft")
    job_id = submit(store, template="chat", self_distillation=1.0)
    assert engine.call("train_submit", (job_id,)) == "running"
    assert job_id in engine.background._awaiting_answers and not engine.background.running
    prompts = regularization.REGULARIZATION_PROMPTS
    assert engine.scheduler.num_waiting + engine.scheduler.num_running == len(prompts)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs == []  # the engine's own requests never reach the server
    running = engine.background.running[job_id]  # started once the last answer arrived
    pool = engine.background._base_answers
    assert 0 < len(pool) <= len(prompts) and running.job.train[-1] is not None
    assert len(running.job.train) == 7 + 7  # 7 examples (1 held out) + ceil(1.0 * 7) base answers
    cached = regularization.load_cached(engine.background._answers_path())
    assert cached == pool
    run_to_end(engine)
    assert store.get_job(job_id).output_path
    # a second engine on the same store reads the cache: no generation
    again = make_engine(tiny_model_dir, tmp_path / "ft")
    second = submit(store, template="chat", self_distillation=0.5)
    assert again.call("train_submit", (second,)) == "running" and second in again.background.running
    assert not again.has_unfinished_requests()
    assert all(seq.soft is None for seq in again.background.running[second].job.train)  # tokens by default
    # self_distillation_kl: the base answers carry the base model's distributions (the trainer's own forward)
    third = submit(store, template="chat", self_distillation=0.5, self_distillation_kl=True)
    assert again.call("train_submit", (third,)) == "running"
    train = again.background.running[third].job.train
    soft = [seq for seq in train if seq.soft is not None]
    assert len(soft) == 4 and len(train) == 7 + 4  # ceil(0.5 * 7): only the base answers, never the user's data
    assert all(torch.allclose(s.soft.probs.sum(dim=1) + s.soft.tail, torch.ones(1)) for s in soft)
    run_to_end(again)
    assert store.get_job(third).output_path
