"""Where loraplex keeps things on disk by default. Imports nothing of the engine, so any module may use it.

Two roots, as before this module existed: `$LORAPLEX_CACHE_DIR` (default `~/.cache/loraplex`) holds what can be
rebuilt (the converted default model, the CPU kernel builds); `$XDG_CACHE_HOME/loraplex` (default
`~/.cache/loraplex`) holds the adapter store and the fine-tuning job store.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Converted models (models/) and CPU kernel builds (kernels/)."""
    return Path(os.environ.get("LORAPLEX_CACHE_DIR") or "~/.cache/loraplex").expanduser()


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/loraplex`, or `~/.cache/loraplex`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loraplex"


def default_adapter_dir() -> Path:
    """The adapter store when `--adapter-dir` is not given."""
    return user_cache_dir() / "adapters"


def default_fine_tuning_dir() -> Path:
    """The fine-tuning job store when `--fine-tuning-dir` is not given."""
    return user_cache_dir() / "fine_tuning"
