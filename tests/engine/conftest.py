"""Fixtures of the engine tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    """A tiny Llama (tests/adapters/peft_factory.make_tiny_model) with the default model's tokenizer."""
    from tests.adapters.peft_factory import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), default_model_dir)
