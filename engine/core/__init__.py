"""The serving core in pure Python (no torch): requests, sampling parameters, configuration, the KV block
manager and the continuous-batching scheduler. Decision-making code over plain data, tested without a model."""
