"""One file per model architecture (Llama family)."""
