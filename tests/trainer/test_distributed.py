"""Multi-process training on torch.distributed (gloo, 2 processes, tiny random model): mLoRA's pipeline and data
parallelism give the single-process batched trainer's gradients and adapters; the schedule's bubble follows mLoRA's
formula; a killed rank is reported and the run resumes from its checkpoints; bad parallel configs fail before
anything starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from loraplex.trainer.job import Hyperparams, TrainingJob
from loraplex.trainer.lora_layers import make_spec
from loraplex.trainer.pipeline_schedule import build_schedule, mlora_bubble

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
THREE_JOBS = [
    {"name": "qv-r4", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
     "hp": {"batch_size": 4, "micro_batch_size": 2}, "n": 10},
    {"name": "all-r8", "lora": {"r": 8, "alpha": 32, "target_modules": ALL, "use_rslora": True},
     "hp": {"batch_size": 3, "micro_batch_size": 3}, "n": 7},
    {"name": "od-r2", "lora": {"r": 2, "alpha": 4, "target_modules": ["o_proj", "down_proj"]},
     "hp": {"batch_size": 2, "micro_batch_size": 1}, "n": 6},
]


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """4 decoder layers (2 per stage), untied head."""
    path = tmp_path_factory.mktemp("tiny-dist")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():
        p.data.normal_(0, 0.15)
    model.save_pretrained(path)
    return path


def make_jobs(spec: dict, model_config) -> list[TrainingJob]:
    """The spec's jobs, B given values (so A's gradients are not trivially zero), the same on every rank."""
    from loraplex.trainer.objectives import DPO
    from tests.trainer.test_dpo import random_pairs
    from tests.trainer.test_multi_job import random_sequences
    jobs = []
    for i, j in enumerate(spec["jobs"]):
        hp = Hyperparams(**({"seed": i + 1, "learning_rate": 1e-2} | j["hp"]))
        dpo = j.get("method") == "dpo"
        data = random_pairs(j["n"], seed=10 + i) if dpo else random_sequences(j["n"], seed=10 + i)
        job = TrainingJob(j["name"], make_spec(j["lora"]), hp, data, model_config,
                          objective=DPO(0.3) if dpo else None)
        with torch.no_grad():
            for b in job.lora.b.values():
                b.normal_(0, 0.05, generator=torch.Generator().manual_seed(i + 1))
        jobs.append(job)
    return jobs


def single_process(spec: dict, model_dir: Path):
    """The reference: the same jobs in one process, one batched step at a time -> per job its gradients at each
    optimizer step, its parameters and its last step's loss."""
    from loraplex.trainer.multi_job import MultiJobTrainer
    from loraplex.trainer.offline import load_base
    model, config, _ = load_base({"quantization": spec.get("quantization", "none")}, str(model_dir),
                                 torch.device("cpu"))
    trainer = MultiJobTrainer(model, config, torch.float32, torch.device("cpu"), max_jobs=8)
    jobs = make_jobs(spec, config)
    grads = {job.job_id: [] for job in jobs}
    for job in jobs:
        names = {id(p): n for n, p in job.lora.named_parameters()}

        def record(job=job, names=names, step=job.optimizer.step):
            grads[job.job_id].append({names[id(p)]: p.grad.clone() for p in job.params if p.grad is not None})
            return step()
        job.optimizer.step = record
        trainer.add_job(job)
    while trainer.jobs:
        trainer.step()
        for job in jobs:  # each job stops after its `steps` optimizer steps
            if job.step >= spec["steps"]:
                trainer.remove_job(job.job_id)
    return (grads, {job.job_id: dict(job.lora.named_parameters()) for job in jobs},
            {job.job_id: job.last_train_loss for job in jobs})


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False, **kw)


def run_workers(spec: dict, tmp_path: Path) -> list[dict]:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    out.mkdir()
    proc = torchrun([str(WORKER), str(tmp_path / "spec.json"), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank-{r}.pt", weights_only=True) for r in range(2)]


def merged(results: list[dict], key: str) -> dict:
    """Per job, the ranks' tensors together (pipeline: each rank holds its layers)."""
    out: dict = {}
    for r in results:
        for job, value in r[key].items():
            if key == "grads":
                steps = out.setdefault(job, [{} for _ in value])
                for mine, part in zip(steps, value):
                    mine.update(part)
            else:
                out.setdefault(job, {}).update(value)
    return out


def layer_of(name: str) -> int:
    """The decoder layer of a job parameter's name (a.L3_q_proj, router.L3, ea.L3_up_proj)."""
    return int(name.split(".")[1].split("_")[0][1:])


def assert_close_dicts(ours: dict, ref: dict, atol: float) -> None:
    assert set(ours) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(ours[name], value.detach(), atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_pipeline_two_stages_three_jobs_match_single_process(tiny4, tmp_path, gradient_checkpointing):
    spec = {"model": str(tiny4), "mode": "pipeline", "steps": 3, "jobs": THREE_JOBS,
            "gradient_checkpointing": gradient_checkpointing}
    results = run_workers(spec, tmp_path)
    # each stage holds only its layers' parameters
    assert {layer_of(k) for k in results[0]["params"]["all-r8"]} == {0, 1}
    assert {layer_of(k) for k in results[1]["params"]["all-r8"]} == {2, 3}
    ref_grads, ref_params, ref_loss = single_process(spec, tiny4)
    grads, params = merged(results, "grads"), merged(results, "params")
    for job in ref_grads:
        assert len(grads[job]) == len(ref_grads[job]) == 3
        for step in range(3):
            assert_close_dicts(grads[job][step], ref_grads[job][step], atol=1e-5)
        assert_close_dicts(params[job], ref_params[job], atol=1e-5)
        assert results[0]["losses"][job] == pytest.approx(ref_loss[job], rel=1e-5)  # rank 0 reports each job's loss


def test_pipeline_one_job_two_micro_batches(tiny4, tmp_path):
    spec = {"model": str(tiny4), "mode": "pipeline", "steps": 2, "jobs": [
        {"name": "one", "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ALL},
         "hp": {"batch_size": 4, "micro_batch_size": 2}, "n": 8}]}
    results = run_workers(spec, tmp_path)
    ref_grads, ref_params, ref_loss = single_process(spec, tiny4)
    grads, params = merged(results, "grads"), merged(results, "params")
    for step in range(2):
        assert_close_dicts(grads["one"][step], ref_grads["one"][step], atol=1e-5)
    assert_close_dicts(params["one"], ref_params["one"], atol=1e-5)
    assert results[0]["losses"]["one"] == pytest.approx(ref_loss["one"], rel=1e-5)


def test_pipeline_mixlora_beside_lora_on_a_quantized_base(tiny4, tmp_path):
    """A MixLoRA job's load-balance loss needs router statistics of every layer: they travel with the activations
    and come back with the gradients; QLoRA: each stage quantizes its own layers, as one process would."""
    spec = {"model": str(tiny4), "mode": "pipeline", "steps": 2, "quantization": "nf4", "jobs": [
        {"name": "moe", "lora": {"type": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "top_k": 2,
                                 "router_aux_loss_coef": 0.5},
         "hp": {"batch_size": 4, "micro_batch_size": 2}, "n": 8},
        THREE_JOBS[0]]}
    results = run_workers(spec, tmp_path)
    ref_grads, ref_params, ref_loss = single_process(spec, tiny4)
    grads, params = merged(results, "grads"), merged(results, "params")
    assert {k.split(".")[0] for k in grads["moe"][0] if layer_of(k) == 3} == {"a", "b", "router", "ea", "eb"}
    for job in ref_grads:
        for step in range(2):
            assert_close_dicts(grads[job][step], ref_grads[job][step], atol=1e-5)
        assert_close_dicts(params[job], ref_params[job], atol=1e-5)
        assert results[0]["losses"][job] == pytest.approx(ref_loss[job], rel=1e-5)


def test_pipeline_dpo_job_beside_sft(tiny4, tmp_path):
    """DPO's loss needs a pair's four sequences (with and without the adapter) in one micro-batch: the last stage
    scales the head's gradients once the chunk's sums are known, as one process does."""
    spec = {"model": str(tiny4), "mode": "pipeline", "steps": 2, "jobs": [
        {"name": "dpo", "method": "dpo", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
         "hp": {"batch_size": 4, "micro_batch_size": 2}, "n": 8}, THREE_JOBS[2]]}
    results = run_workers(spec, tmp_path)
    ref_grads, ref_params, ref_loss = single_process(spec, tiny4)
    grads, params = merged(results, "grads"), merged(results, "params")
    for job in ref_grads:
        for step in range(2):
            assert_close_dicts(grads[job][step], ref_grads[job][step], atol=1e-5)
        assert_close_dicts(params[job], ref_params[job], atol=1e-5)
    assert results[0]["losses"]["dpo"] == pytest.approx(ref_loss["dpo"], rel=1e-5)  # rank 0 reports the loss


def test_data_parallel_matches_the_same_global_batch(tiny4, tmp_path):
    """Three LoRA jobs and a MixLoRA one (its load-balance loss off: with it, each rank's loss is over its own
    share, averaged as DDP does, which one process does not compute)."""
    moe = {"name": "moe", "lora": {"type": "mixlora", "r": 4, "alpha": 8, "num_experts": 4, "router_aux_loss_coef": 0},
           "hp": {"batch_size": 4, "micro_batch_size": 2}, "n": 8}
    spec = {"model": str(tiny4), "mode": "data", "steps": 3, "jobs": [*THREE_JOBS, moe]}
    results = run_workers(spec, tmp_path)
    ref_grads, ref_params, ref_loss = single_process(spec, tiny4)
    for r in results:  # every rank ends with the whole, identical adapters
        for job in ref_params:
            for step in range(3):
                assert_close_dicts(r["grads"][job][step], ref_grads[job][step], atol=1e-5)
            assert_close_dicts(r["params"][job], ref_params[job], atol=1e-5)
            assert r["losses"][job] == pytest.approx(ref_loss[job], rel=1e-5)
    for job in ref_params:
        for name, t in results[0]["params"][job].items():
            assert torch.equal(t, results[1]["params"][job][name])
        assert results[0]["losses"][job] == pytest.approx(results[1]["losses"][job], rel=1e-6)


def test_measured_bubble_with_1_2_and_4_jobs(tiny4, tmp_path):
    """Each stage's time waiting for the other (messages, a step's all-reduce) over its wall time, with 1, 2 and 4
    concurrent jobs of one micro-batch per step, beside mLoRA's formula (0.5, 0, 0 for 2 stages) and the schedule's
    own bubble (fill and drain included), printed. What is asserted is what timing cannot shake: the measured
    fractions are fractions, and the executed schedule's bubble is the formula's (its numbers on the real model:
    scripts/bench/bench_distributed_train.py, README)."""
    job = {"lora": {"r": 8, "alpha": 16, "target_modules": ALL}, "hp": {"batch_size": 4, "micro_batch_size": 4},
           "n": 12}
    for jobs in (1, 2, 4):
        spec = {"model": str(tiny4), "mode": "pipeline", "steps": 4,
                "jobs": [job | {"name": f"j{i}"} for i in range(jobs)]}
        (tmp_path / str(jobs)).mkdir()
        times = [r["times"] for r in run_workers(spec, tmp_path / str(jobs))]
        for t in times:
            assert 0 < t["busy_s"] <= t["wall_s"]
            assert t["schedule_bubble"] == pytest.approx(mlora_bubble(2, jobs), abs=0.15)
        print(f"{jobs} job(s): measured bubble per stage {[round(1 - t['busy_s'] / t['wall_s'], 2) for t in times]}, "
              f"formula {mlora_bubble(2, jobs):.2f}, schedule {times[0]['schedule_bubble']:.2f}")


# ---- the schedule ---------------------------------------------------------------------------------------
def round_robin(num_jobs: int, steps: int, micro: int = 1) -> tuple[list[int], dict[int, int]]:
    groups, after = [], {}
    for t in range(steps):
        for j in range(num_jobs):
            g = t * num_jobs + j
            if t:
                after[g] = g - num_jobs
            groups += [g] * micro
    return groups, after


@pytest.mark.parametrize("stages,jobs,micro", [(2, 1, 1), (2, 1, 2), (2, 2, 1), (2, 4, 1), (4, 1, 1), (4, 2, 1),
                                               (4, 2, 2), (4, 3, 1), (4, 4, 1), (4, 8, 2)])
def test_schedule_bubble_follows_mloras_formula(stages, jobs, micro):
    steps = 200
    schedule = build_schedule(*round_robin(jobs, steps, micro), stages)
    expected = mlora_bubble(stages, jobs, micro)
    for s in range(stages):
        # fill and drain add (D - 1) slots at each end over a long run
        assert schedule.bubble(s) == pytest.approx(expected, abs=2 * stages / schedule.num_slots + 1e-9)
        ops = schedule.stages[s]
        assert sum(op.kind == "F" for op in ops) == sum(op.kind == "B" for op in ops) == jobs * steps * micro
        assert sum(op.kind == "STEP" for op in ops) == jobs * steps


def test_schedule_respects_every_dependency():
    groups, after = round_robin(3, 5, 2)
    d = 3
    schedule = build_schedule(groups, after, d)
    when = {}
    for s, ops in enumerate(schedule.stages):
        for op in ops:
            when[(op.kind, op.index, s)] = op.slot
    for i, g in enumerate(groups):
        for s in range(d):
            if s:
                assert when[("F", i, s)] > when[("F", i, s - 1)]
            nxt = when[("B", i, s + 1)] if s + 1 < d else when[("F", i, s)]
            assert when[("B", i, s)] > nxt
            if g in after:  # the job's previous step is applied on this stage before this micro-batch runs
                assert when[("F", i, s)] > when[("STEP", after[g], s)]
    # the same step order on every stage (a collective)
    assert len({tuple(op.index for op in ops if op.kind == "STEP") for ops in schedule.stages}) == 1


# ---- configs, the launcher, a killed rank -----------------------------------------------------------------
CHAT = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": f"The code word {i} is zebra {i * 7}."}]} for i in range(12)]


@pytest.fixture()
def train_config(tmp_path):
    from tests.engine.test_cuda import build_tokenizer
    model_dir = tmp_path / "model"
    tokenizer = build_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in CHAT))
    return {"model": str(model_dir), "output_dir": "out", "jobs": [
        {"name": f"job{i}", "data": "chat.jsonl", "max_length": 64, "validation_fraction": 0.2,
         "lora": {"r": 2 + 2 * i, "alpha": 8, "target_modules": ["q_proj", "v_proj"] if i else ALL},
         "hyperparameters": {"n_epochs": 3, "batch_size": 2, "micro_batch_size": 1, "learning_rate": 1e-3,
                             "seed": i}} for i in range(2)]}


def loraplex_train(tmp_path: Path, config: dict, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "loraplex.serve.cli", "train", str(tmp_path / "train.yaml"), "--no-progress",
                           *extra], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                          check=False)


@pytest.mark.parametrize("parallel,nproc,message", [
    ({"mode": "pipeline", "stages": 5}, None, "exceeds the model's 4 decoder layers"),
    ({"mode": "pipeline", "stages": 2, "balance": [1, 2]}, None, "sums to 3; the model has 4 decoder layers"),
    ({"mode": "pipeline", "stages": 2, "balance": [4, 0]}, None, "every stage needs at least one layer"),
    ({"mode": "pipeline", "stages": 2}, "3", "parallel.stages is 2 but 3 processes run it"),
    ({"mode": "pipeline", "stages": 1}, None, "stages must be a whole number >= 2"),
    ({"mode": "tensor"}, "2", "parallel.mode must be one of pipeline, data"),
    ({"mode": "data", "stages": 2}, "2", "parallel.stages applies to mode pipeline"),
    ({"mode": "data"}, None, "say how many processes with --nproc-per-node"),
    ({"mode": "data", "shards": 2}, "2", "parallel: unknown keys ['shards']"),
])
def test_bad_parallel_config_fails_before_anything_starts(train_config, tmp_path, parallel, nproc, message, caplog,
                                                         monkeypatch):
    import argparse
    import subprocess as sp

    from loraplex.trainer.cli import run_train
    monkeypatch.setattr(sp, "call", lambda *a, **k: pytest.fail("torchrun was started"))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train_config | {"parallel": parallel}))
    ns = argparse.Namespace(config=str(tmp_path / "train.yaml"), no_progress=True, max_restarts=0,
                            nproc_per_node=int(nproc) if nproc else None)
    assert run_train(ns) == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


def test_bad_parallel_config_from_the_command_line(train_config, tmp_path):
    proc = loraplex_train(tmp_path, train_config | {"parallel": {"mode": "pipeline", "stages": 2, "balance": [3, 3]}})
    assert proc.returncode == 2
    assert "parallel.balance [3, 3] sums to 6; the model has 4 decoder layers" in proc.stderr
    assert "launching" not in proc.stderr and not (tmp_path / "out").exists()


def test_single_process_train_refuses_a_parallel_config(train_config, tmp_path):
    from loraplex.trainer.offline import run_config
    with pytest.raises(ValueError, match="--nproc-per-node"):
        run_config(train_config | {"parallel": {"mode": "data"}}, tmp_path, progress=False)


@pytest.mark.slow
def test_launcher_trains_in_pipeline_and_data_mode_and_peft_reads_the_adapters(train_config, tmp_path):
    from safetensors.torch import load_file
    for mode in ("pipeline", "data"):
        out = tmp_path / mode
        out.mkdir()
        config = train_config | {"output_dir": str(out), "parallel": {"mode": mode, **(
            {"stages": 2} if mode == "pipeline" else {})}}
        wild = config["jobs"][0] | {"name": "wild", "early_stopping_patience": 1, "eval_every": 1,
                                    "hyperparameters": config["jobs"][0]["hyperparameters"] | {"learning_rate": 0.5}}
        jobs = [*config["jobs"], wild] if mode == "pipeline" else config["jobs"]  # early stopping across stages
        config["jobs"] = [j | {"data": str(tmp_path / "chat.jsonl")} for j in jobs]
        proc = loraplex_train(tmp_path, config, "--nproc-per-node", "2")
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "launching 2 ranks" in proc.stderr
        assert "valid_loss" in proc.stderr
        if mode == "pipeline":
            assert "job wild: early stop at step" in proc.stderr
            best = load_file(str(out / "wild" / "adapter_model.safetensors"))  # the best step's, from every stage
            assert {int(k.split(".layers.")[1].split(".")[0]) for k in best} == {0, 1, 2, 3}
        for i in range(2):
            folder = out / f"job{i}"
            cfg = json.loads((folder / "adapter_config.json").read_text())
            assert cfg["r"] == 2 + 2 * i
            tensors = load_file(str(folder / "adapter_model.safetensors"))
            layers = {int(k.split(".layers.")[1].split(".")[0]) for k in tensors}
            assert layers == {0, 1, 2, 3}  # every stage's part gathered into one folder
        assert not (out / ".checkpoints").exists()
        if mode == "pipeline":
            assert "bubble" in proc.stderr
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(train_config["model"])
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "pipeline" / "job0"))
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert len(trained) == 4 * 7 and all(v.abs().sum() > 0 for v in trained.values())  # every layer's, trained


@pytest.mark.slow
def test_killed_rank_is_reported_and_the_run_resumes_from_its_checkpoints(train_config, tmp_path):
    config = train_config | {"parallel": {"mode": "pipeline", "stages": 2, "checkpoint_every": 1}}
    config["jobs"] = [j | {"hyperparameters": j["hyperparameters"] | {"n_epochs": 6}} for j in config["jobs"]]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.serve.cli", "train", str(tmp_path / "train.yaml"), "--no-progress",
                             "--max-restarts", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        ckpt = tmp_path / "out" / ".checkpoints" / "job0"
        deadline = time.time() + 120
        while time.time() < deadline and not list(ckpt.glob("step-*/rank-1/trainer_state.json")):
            time.sleep(0.2)
        assert list(ckpt.glob("step-*/rank-1/trainer_state.json")), "no checkpoint appeared"
        workers = _workers_of(proc.pid)
        assert len(workers) == 2
        os.kill(max(workers), 9)  # one rank dies mid-run
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a hung run behind
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, stderr[-4000:]
    assert "resumed from its checkpoint of step" in stderr
    assert "SIGKILL" in stderr or "exitcode  : -9" in stderr or "exitcode: -9" in stderr  # torchrun names the rank
    assert "a rank failed" in stderr and "restart 1 of 1" in stderr
    resumed = {n: json.loads((tmp_path / "out" / n / "adapter_config.json").read_text()) for n in ("job0", "job1")}
    assert all(cfg["r"] for cfg in resumed.values())

    # the same run without the kill writes the same adapters
    again = tmp_path / "again"
    again.mkdir()
    config2 = config | {"output_dir": str(again / "out")}
    config2["jobs"] = [j | {"data": str(tmp_path / "chat.jsonl")} for j in config["jobs"]]
    proc2 = loraplex_train(again, config2)
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    assert_same_adapters(tmp_path / "out", again / "out", ("job0", "job1"), atol=1e-6)


def assert_same_adapters(one: Path, other: Path, names: tuple[str, ...], atol: float) -> None:
    """The PEFT folders of `names` under both output folders hold the same tensors."""
    from safetensors.torch import load_file
    for name in names:
        a = load_file(str(one / name / "adapter_model.safetensors"))
        b = load_file(str(other / name / "adapter_model.safetensors"))
        assert set(a) == set(b)
        for k, v in a.items():
            torch.testing.assert_close(v, b[k], atol=atol, rtol=0, msg=k)


def _workers_of(pid: int) -> list[int]:
    """The python processes torchrun started under `pid` (the loraplex launcher -> torchrun -> ranks)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    return [w for t in children.get(pid, []) for w in children.get(t, [])]


@pytest.mark.slow
def test_ray_train_torch_trainer_runs_data_mode_like_one_process(train_config, tmp_path):
    """Under Ray Train's TorchTrainer (2 gloo workers) run_distributed uses the process group Ray set up; data mode
    writes the adapters one process writes with the same global batch."""
    ray = pytest.importorskip("ray")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from loraplex.trainer.offline import run_config

    config = train_config | {"parallel": {"mode": "data"}}
    config["jobs"] = [j | {"data": str(tmp_path / "chat.jsonl"), "validation_fraction": 0.0} for j in config["jobs"]]
    ray_config = config | {"output_dir": str(tmp_path / "ray-out")}

    def loop(cfg):
        from loraplex.trainer.distributed import run_distributed
        run_distributed(cfg["config"], Path(cfg["base_dir"]), progress=False)

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    try:
        TorchTrainer(loop, train_loop_config={"config": ray_config, "base_dir": str(tmp_path)},
                     torch_config=TorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="lora")).fit()
    finally:
        ray.shutdown()
    single = {k: v for k, v in config.items() if k != "parallel"} | {"output_dir": str(tmp_path / "one-out")}
    run_config(single, tmp_path, progress=False)
    assert_same_adapters(tmp_path / "ray-out", tmp_path / "one-out", ("job0", "job1"), atol=1e-5)


def test_default_model_layers_are_checked_before_launch(train_config, tmp_path, caplog, monkeypatch,
                                                        default_model_dir):
    """`model: null` (the default model, 30 layers) is resolved by the launcher, so its layer count is checked too."""
    import argparse
    import subprocess as sp

    from loraplex.trainer.cli import run_train
    monkeypatch.setattr(sp, "call", lambda *a, **k: pytest.fail("torchrun was started"))
    config = {k: v for k, v in train_config.items() if k != "model"} | {"parallel": {"mode": "pipeline", "stages": 31}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    ns = argparse.Namespace(config=str(tmp_path / "train.yaml"), no_progress=True, max_restarts=0, nproc_per_node=None)
    assert run_train(ns) == 2
    assert "exceeds the model's 30 decoder layers" in caplog.text
