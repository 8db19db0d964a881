"""CPU kernels: the C++ sources (csrc/), their build and load (cpu_kernels), and oneDNN-prepacked linears
(cpu_linear). Each has a plain-torch reference its callers fall back to."""
