"""latency_vs_llama_cpp.py's long-context mode: the prompt it builds and the key/value bytes it adds to the bound
(the side-by-side run itself needs llama.cpp's server: see the README)."""
from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts" / "bench"))
from latency_vs_llama_cpp import kv_bytes_per_step, long_prompt


def test_long_prompt_reaches_the_context_without_repeating_a_line(default_model_dir):
    text = long_prompt(str(default_model_dir), 600)
    n = len(AutoTokenizer.from_pretrained(default_model_dir)(text)["input_ids"])
    assert 600 <= n < 640  # one line more than needed at most
    lines = text.splitlines()
    assert lines[-1] == "Summarize the shipments above." and len(set(lines)) == len(lines)


def test_kv_bytes_count_every_layers_keys_and_values_in_16_bits(default_model_dir):
    # the default model: 30 layers, 3 kv heads of 64; keys and values, 2 bytes each
    assert kv_bytes_per_step(str(default_model_dir), 1000) == 2 * 30 * 3 * 64 * 2 * 1000
