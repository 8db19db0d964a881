"""HTTP API (Starlette), CLI, metrics and auth."""
