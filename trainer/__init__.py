"""Trainer: multi-adapter LoRA fine-tuning on the served base model (issue 5)."""
