"""Adapters: PEFT format, adapter store, paged LoRA weight pool, batched LoRA ops (issue 3)."""
