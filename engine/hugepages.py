"""A CPU model's weights on transparent huge pages.

Decode at small batches streams every weight from memory once per step. On 4 KiB pages that stream crosses a page
(and a TLB entry) every 4 KiB; on 2 MiB pages it crosses one every 2 MiB. Linux backs anonymous memory with huge pages
where it is asked to (`transparent_hugepage/enabled` = madvise, the default of Debian and Ubuntu) or always; torch's
allocator never asks. `move_to_huge_pages` copies every CPU weight storage of a model into one anonymous mapping
advised MADV_HUGEPAGE and re-points each tensor on it (`Tensor.set_`: every module, group and view that holds the
tensor sees the new memory; tensors sharing a storage, such as a tied head, keep sharing it). One mapping, so the
2 MiB alignment is paid once, not per tensor. The copy is exact: nothing changes but the addresses.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
from pathlib import Path

import torch
from torch import nn

from loraplex.engine.quant.stream import named_weights

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # each storage starts on a cache line
MIN_STORAGE_BYTES = 64 << 10  # smaller storages (norms, biases) stay where they are
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always, madvise, never), or "unavailable"."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "unavailable"
    chosen = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else "unavailable"


def huge_pages_possible() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and thp_mode() in ("always", "madvise")


def _movable(t: torch.Tensor) -> bool:
    return (t is not None and t.device.type == "cpu" and type(t) in (torch.Tensor, nn.Parameter) and not t.is_sparse
            and t.layout == torch.strided and not t.is_quantized)


def move_to_huge_pages(model: nn.Module, min_storage_bytes: int = MIN_STORAGE_BYTES) -> int:
    """Re-home the model's CPU weight storages of at least `min_storage_bytes` on one huge-page mapping; returns the
    bytes moved (0 where the kernel offers no transparent huge pages). Call it before anything caches raw pointers
    to the weights (the CPU kernels' layer descriptions are built on first use, after this)."""
    return move_to_huge_pages_tensors([t for _, t in named_weights(model)], "weights", min_storage_bytes)


def move_to_huge_pages_tensors(tensors: list[torch.Tensor], what: str,
                               min_storage_bytes: int = MIN_STORAGE_BYTES, zeros: bool = False) -> int:
    """move_to_huge_pages for any tensors (the KV cache): each distinct CPU storage of at least `min_storage_bytes`
    copied into one mapping advised MADV_HUGEPAGE, every given tensor on it re-pointed in place. `zeros`: the caller
    knows the storages hold only zeros (a fresh KV cache): nothing is copied, the new mapping is zeros already and
    its pages are only backed as they are first written, as a fresh allocation's are."""
    if not huge_pages_possible():
        logger.info("%s stay on normal pages: transparent huge pages are %s", what, thp_mode())
        return 0
    storages: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for t in tensors:
        if not _movable(t):
            continue
        try:
            s = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # opaque (oneDNN-prepacked) tensors
            continue
        if s.nbytes() < min_storage_bytes:
            continue
        entry = storages.setdefault(s.data_ptr(), (s, []))
        if not any(t is u for u in entry[1]):
            entry[1].append(t)
    if not storages:
        return 0
    offsets, total = {}, 0
    for key, (s, _) in storages.items():
        offsets[key] = total
        total += (s.nbytes() + ALIGN - 1) // ALIGN * ALIGN
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` for as long as the storage lives
    start = (-arena.data_ptr()) % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, start, (total + HUGE_PAGE - start) // mmap.PAGESIZE * mmap.PAGESIZE)
    target = arena.untyped_storage()
    with torch.no_grad():
        for key, (s, on_it) in storages.items():  # one storage at a time: the old one is freed as the next is copied
            at = start + offsets[key]
            if not zeros:
                arena[at:at + s.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(s))
            for t in on_it:
                size = t.element_size()
                t.set_(target, (at + t.storage_offset() * size) // size, t.size(), t.stride())
    del storages, on_it, s  # the last references to the old storages here
    _release_freed_memory()
    logger.info("%s on transparent huge pages: %d storages, %.1f MiB (%s)", what, len(offsets), total / 2**20,
                thp_mode())
    return total


def _release_freed_memory() -> None:
    """Give the old storages' memory back to the system: glibc keeps freed blocks below its (adaptive, up to 32 MiB)
    mmap threshold in its heap, where they would stay resident beside their copies."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the huge pages backing the mapping that holds `tensor` (/proc/self/smaps; tests and diagnostics)."""
    address = tensor.data_ptr()
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0
