"""One rank of the distributed-training parity tests (tests/trainer/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/trainer/dist_worker.py SPEC.json OUT

SPEC.json names the tiny model, the mode (pipeline | data), the jobs (name, lora spec, hyperparameters) and the
number of optimizer steps; the worker trains them and writes OUT/rank-R.pt: every job's gradients at each
optimizer step (as the optimizer sees them) and its parameters at the end, under PEFT names.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from loraplex.engine.llm_engine import _read_model_config
    from loraplex.engine.loader import ModelParts
    from loraplex.trainer.distributed import DistributedRun, stage_bounds
    from loraplex.trainer.multi_job import MultiJobTrainer
    from loraplex.trainer.offline import load_base
    from loraplex.trainer.pipeline import PipelineStage
    from tests.trainer.test_distributed import make_jobs
    model_config = _read_model_config(spec["model"])
    bounds = stage_bounds(model_config, world, None) if spec["mode"] == "pipeline" else None
    parts = ModelParts(bounds[rank], rank == 0, rank == world - 1) if bounds else None
    model, model_config, _ = load_base({"quantization": spec.get("quantization", "none")}, spec["model"],
                                       torch.device("cpu"), parts)
    trainer = MultiJobTrainer(model, model_config, torch.float32, torch.device("cpu"), max_jobs=8,
                              gradient_checkpointing=spec.get("gradient_checkpointing", False),
                              layers=bounds[rank] if bounds else None)
    jobs = make_jobs(spec, model_config)
    grads: dict[str, list[dict[str, torch.Tensor]]] = {job.job_id: [] for job in jobs}
    for job in jobs:
        if bounds:
            job.keep_layers(bounds[rank])
            job.global_norm = DistributedRun._global_norm
        else:
            job.shard = (rank, world)
            job.all_reduce = dist.all_reduce
        names = {id(p): n for n, p in job.lora.named_parameters()}

        def record(job=job, names=names, step=job.optimizer.step):
            grads[job.job_id].append({names[id(p)]: p.grad.clone() for p in job.params if p.grad is not None})
            return step()
        job.optimizer.step = record

    times = None
    if bounds:
        stage = PipelineStage(trainer, rank, bounds, torch.device("cpu"))
        schedule = stage.train(jobs, {job.job_id: spec["steps"] for job in jobs})
        times = {"busy_s": stage.busy_s, "wall_s": stage.wall_s, "schedule_bubble": schedule.bubble(rank)}
    else:
        for job in jobs:
            trainer.add_job(job)
        while trainer.jobs:
            trainer.step()
            for job in jobs:
                if job.step >= spec["steps"]:
                    trainer.remove_job(job.job_id)
    result = {"grads": grads, "params": {job.job_id: {n: p.detach().clone() for n, p in job.lora.named_parameters()}
                                         for job in jobs},
              "losses": {job.job_id: job.last_train_loss for job in jobs}, "times": times}
    torch.save(result, out / f"rank-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
