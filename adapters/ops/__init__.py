"""Batched LoRA ops: y += B[a] · (A[a] · x) for every token's adapter a, over the paged pool."""
