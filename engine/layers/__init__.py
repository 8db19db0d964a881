"""The building blocks model files use: paged attention, the elementwise pieces (RMSNorm, rotary, SiLU),
the flattened batch they read (ForwardBatch) and the batched sampler."""
