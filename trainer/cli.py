"""`loraplex train CONFIG.yaml`: fine-tune several LoRA adapters together, no server (trainer/offline.py)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("loraplex.trainer")


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="fine-tune several LoRA adapters together from a YAML config, no server "
                           "(see trainer/offline.py for the keys); writes PEFT folders")
    train.add_argument("config", help="the YAML file; data paths in it are relative to its folder")
    train.add_argument("--no-progress", action="store_true", help="log lines only, no progress bars")
    train.set_defaults(run=run_train)


def run_train(ns: argparse.Namespace) -> int:
    from loraplex.trainer.data import DataError
    from loraplex.trainer.offline import load_config, run_config
    path = Path(ns.config)
    try:
        summary = run_config(load_config(path), base_dir=path.parent, progress=not ns.no_progress)
    except (ValueError, DataError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    for name, result in summary.items():
        print(f"{name}: {result['path']} (steps {result['steps']}, train_loss {result['train_loss']:.4f}, "
              f"valid_loss {result['valid_loss'] if result['valid_loss'] is None else round(result['valid_loss'], 4)})")
    return 0
