"""Shared fixtures: the default model folder (fetched by the test command's set-up step)."""
from __future__ import annotations

import os

import pytest
import torch

from loraplex.engine.kernels.cpu_linear import cap_isa_for_batch_invariance

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# oneDNN runs here as in the engine process of a default (--batch-invariant) server: off AMX on a CPU that has it
# (engine/kernels/cpu_linear.py says why). Only a setting made before this process's first oneDNN call counts.
# test_cpu_linear.py runs the AMX path (--no-batch-invariant) in processes of its own.
cap_isa_for_batch_invariance()

pytest_plugins = ["tests.storage_fixtures"]  # postgres, seaweedfs, backend (the store contract tests)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_dir():
    from loraplex.engine.default_model import ensure_default_model
    return ensure_default_model(progress=lambda *a: None)
