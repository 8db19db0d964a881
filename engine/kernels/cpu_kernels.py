"""CPU kernels built from source once per machine (engine/kernels/csrc/*.cpp), with plain-torch references.

`torch.utils.cpp_extension` compiles the sources with the system C++ compiler (-O3 -march=native,
OpenMP) into `$LORAPLEX_CACHE_DIR/kernels/<key>/` on first use (10-60 s, logged), then loads the cached
library in milliseconds, whichever checkout or install of the same sources built it. The key covers the sources'
contents, the torch version, the CPU model and the compiler flags, so a cache shared between machines never loads a
library built for another CPU. Without a compiler, or with
`LORAPLEX_CPU_KERNELS=0`, `available()` is False and callers keep the plain-torch path, which is also
what the tests compare the kernels against.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from loraplex.engine.paths import cache_dir

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("cpu_attention.cpp", "cpu_attention_backward.cpp",
                                                                      "cpu_ops.cpp", "cpu_lora.cpp",
                                                                      "cpu_stream_linear.cpp", "cpu_decoder_layer.cpp",
                                                                      "cpu_greedy_head.cpp")]
HEADERS = [Path(__file__).parent / "csrc" / name for name in ("cpu_vec.h", "cpu_layer_parts.h")]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once tried, "error": str when the build failed


def enabled() -> bool:
    return os.environ.get("LORAPLEX_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line  # first of either: enough to tell CPU generations apart
    except OSError:
        pass
    return platform.processor() or platform.machine()


def target_arch() -> str:
    """-march for the build: this CPU, unless LORAPLEX_CPU_KERNELS_ARCH names another (e.g. x86-64-v3,
    an AVX2 machine: the tests build that too, to exercise the generic code paths)."""
    return os.environ.get("LORAPLEX_CPU_KERNELS_ARCH") or "native"


def _cflags() -> list[str]:
    return ["-O3", f"-march={target_arch()}", "-fopenmp", "-DNDEBUG"]


def build_key() -> str:
    """What the built library depends on: the sources' contents (not where they are), the torch version, the CPU and
    the compiler flags."""
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_cpu_model().encode())
    h.update(" ".join(_cflags()).encode())
    return h.hexdigest()[:16]


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI wheel ships the binary
        candidates.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    for d in candidates:
        if os.path.exists(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def available() -> bool:
    """Build (first call on this machine) and load the kernels; False if disabled or the build fails."""
    if not enabled():
        return False
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        _state["ok"] = False
        try:
            _build_and_load()
            _state["ok"] = True
        except Exception as e:  # no compiler, no ninja, a compile error: keep the torch path
            _state["error"] = f"{type(e).__name__}: {e}"
            logger.warning("CPU kernels unavailable, using the plain-torch path (%s)", str(e).splitlines()[0]
                           if str(e) else type(e).__name__)
        return bool(_state["ok"])


def loaded() -> bool:
    """Whether available() has already built and loaded them (never starts a build). Cheap: called per op."""
    return _state.get("ok") is True and not _state.get("suspended")


@contextlib.contextmanager
def suspended():
    """Callers take their plain-torch paths inside this block (tests compare the two; not thread-safe)."""
    before = _state.get("suspended", False)
    _state["suspended"] = True
    try:
        yield
    finally:
        _state["suspended"] = before


def build_error() -> str | None:
    """Why the last build failed, if it did."""
    return _state.get("error")  # type: ignore[return-value]


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    key = build_key()
    build_dir = cache_dir() / "kernels" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"loraplex_cpu_{key}"
    _drop_stale_lock(build_dir)
    library = build_dir / f"{name}.so"
    cached = library.exists()
    if cached and not (build_dir / "lock").exists():
        # The key names the sources' contents: a library built from them by any checkout or install on this machine
        # is this one. Loaded as it is: torch's own check would rebuild it for sources at another path (another
        # clone, a venv's site-packages), and two checkouts would rebuild it in turn at every start.
        try:
            torch.ops.load_library(str(library))
            os.utime(build_dir)
            return
        except OSError as e:  # damaged, or half-written by a build killed mid-link (no build holds the lock)
            logger.warning("cached CPU kernels at %s did not load (%s): building them again", library, e)
            library.unlink(missing_ok=True)  # else torch, finding its build up to date, would load the same file
            cached = False
    if not cached:
        _ensure_ninja_on_path()
        logger.info("building CPU kernels once for this machine into %s (10-60 s)", build_dir)
    t0 = time.perf_counter()
    cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
                       extra_cflags=_cflags(), extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    os.utime(build_dir)  # last loaded now: other builds are pruned by age, not removed under a running checkout
    if not cached:
        logger.info("CPU kernels built in %.1f s (%s code paths)", time.perf_counter() - t0,
                    torch.ops.loraplex_cpu.vector_isa())
        if target_arch() == "native":
            _prune_other_builds(build_dir)


STALE_LOCK_S = 600  # a build takes 10-60 s: an older lock is left by a process killed while building


def _drop_stale_lock(build_dir: Path, older_than_s: float = STALE_LOCK_S) -> None:
    """torch's cpp_extension serialises builds with a `lock` file and waits for it for ever; a process killed while
    building leaves it behind, and every later start would hang. One older than any build is removed (logged)."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > older_than_s:
        logger.warning("removing a stale CPU-kernel build lock (%.0f s old) left by an interrupted build: %s", age, lock)
        lock.unlink(missing_ok=True)


PRUNE_AFTER_S = 7 * 86400


def _prune_other_builds(keep: Path, older_than_s: float = PRUNE_AFTER_S) -> None:
    """Builds of older sources (an upgrade) not loaded for a week are removed. Not at once: two checkouts of
    different versions on one machine (a test run beside a development tree) would otherwise delete each other's
    build at every start and rebuild for ever."""
    now = time.time()
    for other in keep.parent.iterdir():
        if other != keep and other.is_dir() and re.fullmatch(r"[0-9a-f]{16}", other.name):
            try:
                stale = now - other.stat().st_mtime > older_than_s
            except OSError:
                continue
            if stale:
                shutil.rmtree(other, ignore_errors=True)


def stream_ahead(nbytes: int | None = None) -> int:
    """The distance, in bytes, at which the streaming linears' first row tile over each block of weights (every tile
    at batch 1) prefetches them (0: not at all); with `nbytes` (a multiple of 64, at most 64 KiB) set it and return
    the previous one. Speed only: no result changes. Each build starts at the distance measured best on its kind of
    machine (cpu_stream_linear.cpp)."""
    return int(torch.ops.loraplex_cpu.stream_ahead(nbytes))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_table: torch.Tensor,
                    row_index: torch.Tensor, row_len: torch.Tensor, window: int | None, scale: float,
                    k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                    slot_mapping: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]: query row t attends to the first row_len[t] slots of
    slot_table[row_index[t]] (only the last `window` of them with a sliding window), reading k/v
    [S, KVH, D] in place. q must have the caches' dtype (float32 or bfloat16). With k_new/v_new
    [T, KVH, D] and slot_mapping [T], those rows are written into the caches first (write_kv)."""
    return torch.ops.loraplex_cpu.paged_attention(q, k_cache, v_cache, slot_table, row_index, row_len,
                                                  window or 0, scale, k_new, v_new, slot_mapping)


def packed_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                              cu_seqlens: torch.Tensor, window: int | None, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of causal self-attention over packed sequences (rows [cu_seqlens[b],
    cu_seqlens[b+1]) each, from position 0; q, grad_out [N, H, D], k, v [N, KVH, D], one dtype)."""
    return torch.ops.loraplex_cpu.packed_attention_backward(q, k, v, grad_out, cu_seqlens, window or 0, scale)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_table: torch.Tensor, row_index: torch.Tensor, row_len: torch.Tensor,
                              window: int | None, scale: float) -> torch.Tensor:
    """Plain torch, one query row at a time, float32 throughout: what the kernel computes."""
    num_kv_heads = k_cache.shape[1]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    for t in range(q.shape[0]):
        n = int(row_len[t])
        first = max(0, n - window) if window else 0
        slots = slot_table[row_index[t], first:n]
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[t].float(), k) * scale  # [H, n]
        out[t] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out
