"""Model code, paged KV cache, continuous-batching scheduler, sampler and the step loop."""
