"""`loraplex train CONFIG.yaml`: fine-tune several LoRA adapters together, no server (trainer/offline.py); with
--nproc-per-node N, across N processes (trainer/distributed.py: the config's parallel section), through torchrun."""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("loraplex.trainer")


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="fine-tune several LoRA adapters together from a YAML config, no server "
                           "(see trainer/offline.py for the keys); writes PEFT folders")
    train.add_argument("config", help="the YAML file; data paths in it are relative to its folder")
    train.add_argument("--no-progress", action="store_true", help="log lines only, no progress bars")
    train.add_argument("--nproc-per-node", type=int, default=None,
                       help="train across this many processes on this machine (torchrun), as the config's parallel "
                            "section says (mode pipeline: one per stage, the default; mode data: required)")
    train.add_argument("--max-restarts", type=int, default=3,
                       help="across processes: times the ranks are started again after one fails; each restart "
                            "resumes every job from its last checkpoint")
    train.set_defaults(run=run_train)


def run_train(ns: argparse.Namespace) -> int:
    from loraplex.trainer.data import DataError
    from loraplex.trainer.offline import load_config, run_config
    path = Path(ns.config)
    try:
        config = load_config(path)
        if config.get("parallel") or ns.nproc_per_node:
            return _launch(path, config, ns)
        summary = run_config(config, base_dir=path.parent, progress=not ns.no_progress)
    except (ValueError, DataError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    for name, result in summary.items():
        print(f"{name}: {result['path']} (steps {result['steps']}, train_loss {result['train_loss']:.4f}, "
              f"valid_loss {result['valid_loss'] if result['valid_loss'] is None else round(result['valid_loss'], 4)})")
    return 0


def _launch(path: Path, config: dict, ns: argparse.Namespace) -> int:
    """Check the parallel section against the model, then run torchrun with one rank per process."""
    from loraplex.trainer.distributed import check_parallel, parse_parallel
    if not config.get("parallel"):
        raise ValueError("--nproc-per-node needs a parallel section in the config: {mode: pipeline | data, ...}")
    par = parse_parallel(config["parallel"])
    nproc = ns.nproc_per_node or (par.stages if par.mode == "pipeline" else None)
    if nproc is None:
        raise ValueError("parallel.mode data: say how many processes with --nproc-per-node N")
    if nproc < 1:
        raise ValueError("--nproc-per-node must be at least 1")
    from loraplex.trainer.offline import model_path_of
    check_parallel(config, nproc, model_path_of(config))  # the default model too: fetched once, here, not per rank
    if ns.max_restarts < 0:
        raise ValueError("--max-restarts must be at least 0")
    # each attempt is a fresh torchrun (a new rendezvous): torchrun's own in-place restarts were seen to hang here
    # in the new ranks' process-group set-up after a rank was killed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", "-m", "loraplex.trainer.distributed", str(path)]
    if ns.no_progress:
        cmd.append("--no-progress")
    logger.info("launching %d ranks (%s): %s", nproc, par.mode, " ".join(cmd))
    for attempt in range(ns.max_restarts + 1):
        rc = subprocess.call(cmd)
        if rc == 0:
            return 0
        if attempt < ns.max_restarts:
            logger.warning("a rank failed (exit status %d; torchrun's log above names it): starting the ranks again "
                           "(restart %d of %d), every job resumes from its last checkpoint", rc, attempt + 1,
                           ns.max_restarts)
    logger.error("training failed (exit status %d; torchrun's log above names the rank); run the same command "
                 "again to resume every job from its last checkpoint", rc)
    return rc
