"""The paged LoRA weight pool (S-LoRA style): one page = one rank-row of every target module of every
layer, so adapters of any rank share the pool with no padding to the largest one.

Decision-making is pure Python and tested without tensors: `PageAllocator` hands out pages,
`AdapterPool` decides residency (pin while in use, LRU eviction of unpinned adapters, retiring old
versions once their last request drains). `LoRAWeightPool` is the tensor side the ops read.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from loraplex.adapters.ops.meta import ZERO_PAGE

AdapterKey = Hashable  # (adapter_id, version) in the server


class PageAllocator:
    """Pages 1..num_pages-1; page 0 is the all-zero page that pads page lists and is never handed out."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError("a LoRA pool needs at least 2 pages (page 0 is reserved)")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int] | None:
        if n <= 0:
            raise ValueError("allocate at least one page")
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        if any(p == ZERO_PAGE or not 0 < p < self.num_pages for p in pages):
            raise ValueError(f"invalid page ids {pages}")
        self._free.extend(reversed(pages))


@dataclass(slots=True)
class ResidentAdapter:
    key: AdapterKey
    pages: list[int]
    pin_count: int = 0
    retired: bool = False  # superseded or deleted: evict as soon as the last pin goes
    slot: int | None = None  # its router slot (MixLoRA adapters), see LoRARuntime


class AdapterPool:
    """Which adapters hold pages. `acquire` pins an adapter (writing it into fresh pages via `load`
    when it is not resident, evicting unpinned adapters least recently used first); `release` unpins.
    `on_evict(key)` is told about every eviction (the host tier keeps a copy).

    Adapters that also need one of `num_slots` router slots (MixLoRA: its per-layer routers live in a
    small separate pool) ask for it with `slot=True`; a slot is then a second resource that can force
    evictions, of unpinned slot holders only."""

    def __init__(self, num_pages: int, on_evict: Callable[[AdapterKey], None] | None = None,
                 num_slots: int = 0) -> None:
        self.allocator = PageAllocator(num_pages)
        self.on_evict = on_evict
        self.num_slots = num_slots
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self.resident: OrderedDict[AdapterKey, ResidentAdapter] = OrderedDict()  # LRU first
        self.num_loads = 0
        self.num_evictions = 0

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_pages(self) -> int:
        return self.allocator.num_usable - self.allocator.num_free

    def pages(self, key: AdapterKey) -> list[int]:
        return self.resident[key].pages

    def is_resident(self, key: AdapterKey) -> bool:
        return key in self.resident

    def pin_count(self, key: AdapterKey) -> int:
        entry = self.resident.get(key)
        return 0 if entry is None else entry.pin_count

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def slot(self, key: AdapterKey) -> int | None:
        return self.resident[key].slot

    def can_acquire(self, key: AdapterKey, rank: int, slot: bool = False) -> bool:
        if key in self.resident:
            return True
        unpinned = [e for e in self.resident.values() if e.pin_count == 0]
        if slot and len(self._free_slots) + sum(e.slot is not None for e in unpinned) < 1:
            return False
        return self.allocator.num_free + sum(len(e.pages) for e in unpinned) >= rank

    def acquire(self, key: AdapterKey, rank: int, load: Callable[..., None], slot: bool = False) -> list[int] | None:
        """Pin `key`, loading it into `rank` pages (and a router slot, with `slot`) if needed: `load(pages)`, or
        `load(pages, slot)`. None when pinned adapters leave no room."""
        entry = self.resident.get(key)
        if entry is not None:
            entry.pin_count += 1
            self.resident.move_to_end(key)
            return entry.pages
        if rank > self.allocator.num_usable:
            raise ValueError(f"rank {rank} exceeds the pool's {self.allocator.num_usable} pages")
        if slot and self.num_slots == 0:
            raise ValueError("this pool has no router slots")
        if not self.can_acquire(key, rank, slot):
            return None
        while slot and not self._free_slots:
            self.evict(next(k for k, e in self.resident.items() if e.pin_count == 0 and e.slot is not None))
        while self.allocator.num_free < rank:
            self.evict(next(k for k, e in self.resident.items() if e.pin_count == 0))
        pages = self.allocator.allocate(rank)
        assert pages is not None
        slot_id = self._free_slots.pop() if slot else None
        try:
            if slot:
                load(pages, slot_id)
            else:
                load(pages)
        except BaseException:
            self.allocator.free(pages)
            if slot_id is not None:
                self._free_slots.append(slot_id)
            raise
        self.resident[key] = ResidentAdapter(key, pages, pin_count=1, slot=slot_id)
        self.num_loads += 1
        return pages

    def release(self, key: AdapterKey) -> None:
        entry = self.resident[key]
        if entry.pin_count <= 0:
            raise ValueError(f"adapter {key!r} is not pinned")
        entry.pin_count -= 1
        if entry.pin_count == 0 and entry.retired:
            self.evict(key)

    def retire(self, key: AdapterKey) -> None:
        """No new pins will come (a newer version was published, or it was deleted): free its pages
        now, or when its last running request releases it."""
        entry = self.resident.get(key)
        if entry is None:
            return
        if entry.pin_count == 0:
            self.evict(key)
        else:
            entry.retired = True

    def evict(self, key: AdapterKey) -> None:
        entry = self.resident.pop(key)
        if entry.pin_count:
            self.resident[key] = entry
            raise ValueError(f"adapter {key!r} is pinned by {entry.pin_count} running request(s)")
        self.allocator.free(entry.pages)
        if entry.slot is not None:
            self._free_slots.append(entry.slot)
        self.num_evictions += 1
        if self.on_evict is not None:
            self.on_evict(key)


class LoRAWeightPool:
    """The pool's tensors: per layer and module, `a[layer][module] [num_pages, in]` (row p = rank-row p
    of A) and `b[layer][module] [num_pages, out]` (row p = column p of B, scale folded in)."""

    def __init__(self, num_pages: int, num_layers: int, shapes: dict[str, tuple[int, int]],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_pages, self.num_layers, self.shapes = num_pages, num_layers, dict(shapes)
        self.dtype, self.device = dtype, torch.device(device)
        self.a = [{m: torch.zeros(num_pages, i, dtype=dtype, device=device) for m, (i, o) in shapes.items()}
                  for _ in range(num_layers)]
        self.b = [{m: torch.zeros(num_pages, o, dtype=dtype, device=device) for m, (i, o) in shapes.items()}
                  for _ in range(num_layers)]

    def tensors(self) -> list[torch.Tensor]:
        """Every pool tensor, A's then B's."""
        return [t for layers in (self.a, self.b) for per_module in layers for t in per_module.values()]

    @staticmethod
    def bytes_per_page(num_layers: int, shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return num_layers * sum(i + o for i, o in shapes.values()) * elem

    @torch.no_grad()
    def write(self, pages: list[int], tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter (per (layer, module): A [r_m, in], B·scale [out, r_m]) into `pages`; rows of
        modules it does not target, and rank-rows past a module's own r_m, are zeroed."""
        index = torch.tensor(pages, dtype=torch.int64, device=self.device)
        rank = len(pages)
        for layer in range(self.num_layers):
            for module, (in_f, out_f) in self.shapes.items():
                pair = tensors.get((layer, module))
                a_rows = torch.zeros(rank, in_f, dtype=self.dtype, device=self.device)
                b_rows = torch.zeros(rank, out_f, dtype=self.dtype, device=self.device)
                if pair is not None:
                    a, b = pair  # [r_m, in], [out, r_m]
                    a_rows[:a.shape[0]] = a.to(self.device, self.dtype)
                    b_rows[:b.shape[1]] = b.t().to(self.device, self.dtype)
                self.a[layer][module].index_copy_(0, index, a_rows)
                self.b[layer][module].index_copy_(0, index, b_rows)
