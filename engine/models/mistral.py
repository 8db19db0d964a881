"""Mistral: the Llama decoder; its sliding window lives in the attention masks (ModelConfig.sliding_window)."""
from __future__ import annotations

from .llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Same weights and layout as Llama; the runner passes config.sliding_window to build_forward_batch."""
