"""Qwen2: the Llama decoder with bias on q/k/v (config.attention_bias) and never on o_proj."""
from __future__ import annotations

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    o_proj_bias = False
