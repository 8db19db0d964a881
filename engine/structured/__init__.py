"""Structured output: each constrained request's grammar (JSON schema, JSON object, regex, choice, EBNF) compiled off
the step loop and cached, its matcher advanced by every sampled token, and each step's token bitmask for the sampler.
Backed by xgrammar (the `structured` extra), imported only when a request asks for structured output."""
