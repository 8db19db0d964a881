"""The engine: the step loop and its processes at this level; core/ (pure Python: requests, KV blocks, scheduler),
layers/ and models/ (the model code), quant/ (quantized base linears), kernels/ (CPU C++ kernels). It imports
nothing from adapters/, trainer/ or serve/ (tests/test_layout.py)."""
