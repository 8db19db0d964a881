"""Adapters with their own input embedding and output head (PEFT's `modules_to_save` for embed_tokens / lm_head, and
LoRA on them), served in the same batches as every other row.

Each such adapter's embedding and head are materialised once, when it is read (`materialise`: the saved matrix, or
the base's, plus its LoRA delta), and loaded into a slot of `ModuleSlots`: a few whole [vocab, hidden] matrices
per module, allocated on first use, pinned by running requests and evicted least recently used like the pool's
pages (the host tier keeps the materialised matrices). In a step, `AdapterEmbedding` replaces the embeddings of
those adapters' rows with their slot's rows, and `AdapterHead` computes their logits with their slot's head; base
rows and every other adapter's rows use the base matrices as before.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.adapters.peft import LoRAWeights

MODULES = ("embed_tokens", "lm_head")


@torch.no_grad()
def materialise(weights: LoRAWeights, base: Callable[[str], torch.Tensor], dtype: torch.dtype
                ) -> dict[str, torch.Tensor]:
    """Per full module of the adapter, its weight [vocab, hidden]: the saved one (or `base(module)`, float32) plus
    its LoRA delta left @ right, in `dtype`."""
    out = {}
    for module, (full, lora) in weights.full.items():
        w = (base(module) if full is None else full).float()
        if lora is not None:
            left, right = lora
            w = w + left.float().to(w.device) @ right.float().to(w.device)
        out[module] = w.to(dtype).contiguous()
    return out


@dataclass(slots=True)
class _Slot:
    index: int
    modules: tuple[str, ...]
    pin_count: int = 0
    retired: bool = False


class ModuleSlots:
    """`num_slots` whole-matrix slots per full module, LRU with pins (AdapterPool's rules for pages)."""

    def __init__(self, num_slots: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_slots, self.vocab, self.hidden = num_slots, vocab, hidden
        self.dtype, self.device = dtype, device
        self.weights: dict[str, torch.Tensor] = {}  # module -> [num_slots, vocab, hidden], made on first use
        self.resident: OrderedDict[object, _Slot] = OrderedDict()  # LRU first
        self._free = list(range(num_slots - 1, -1, -1))
        self.num_loads = self.num_evictions = 0

    def slot(self, key) -> int:
        return self.resident[key].index

    def pin_count(self, key) -> int:
        entry = self.resident.get(key)
        return 0 if entry is None else entry.pin_count

    def acquire(self, key, weights: Callable[[], dict[str, torch.Tensor]]) -> int | None:
        """Pin `key`'s slot, writing `weights()` into a free or evicted one first; None when every slot is pinned."""
        entry = self.resident.get(key)
        if entry is not None:
            entry.pin_count += 1
            self.resident.move_to_end(key)
            return entry.index
        if not self._free:
            victim = next((k for k, e in self.resident.items() if e.pin_count == 0), None)
            if victim is None:
                return None
            self.evict(victim)
        index = self._free.pop()
        matrices = weights()
        for module, w in matrices.items():
            pool = self.weights.get(module)
            if pool is None:
                pool = self.weights[module] = torch.empty(self.num_slots, self.vocab, self.hidden, dtype=self.dtype,
                                                          device=self.device)
            pool[index].copy_(w)
        self.resident[key] = _Slot(index, tuple(matrices), pin_count=1)
        self.num_loads += 1
        return index

    def release(self, key) -> None:
        entry = self.resident[key]
        entry.pin_count -= 1
        if entry.pin_count == 0 and entry.retired:
            self.evict(key)

    def retire(self, key) -> None:
        entry = self.resident.get(key)
        if entry is None:
            return
        entry.retired = True
        if entry.pin_count == 0:
            self.evict(key)

    def evict(self, key) -> None:
        entry = self.resident.pop(key)
        assert entry.pin_count == 0, f"evicting pinned full modules of {key!r}"
        self._free.append(entry.index)
        self.num_evictions += 1


@dataclass(slots=True)
class FullModuleStep:
    """One step's rows with their own modules: embedding rows (batch rows, slots) and, per batch row, the slot of
    its head (-1: the base head), with the slots present (no device sync to find them)."""
    embed: tuple[torch.Tensor, torch.Tensor] | None
    head: torch.Tensor | None  # [num_tokens] int64
    head_slots: tuple[int, ...] = ()


class AdapterEmbedding(nn.Module):
    def __init__(self, base: nn.Module, slots: ModuleSlots, state) -> None:
        super().__init__()
        self.base, self.slots, self.state = base, slots, state
        self.weight = base.weight  # tie_weights and the loaders see the base embedding's weight as before

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        x = self.base(ids)
        step = self.state.full
        if step is None or step.embed is None:
            return x
        rows, slot_ids = step.embed
        own = self.slots.weights["embed_tokens"][slot_ids, ids.index_select(0, rows)]  # [n, hidden]
        return x.index_copy_(0, rows, own.to(x.dtype))


class AdapterHead(nn.Module):
    """The output head; with `rows` (the batch rows `hidden` holds), rows of adapters with their own head use it."""
    takes_rows = True

    def __init__(self, base: nn.Module, slots: ModuleSlots, state) -> None:
        super().__init__()
        self.base, self.slots, self.state = base, slots, state

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def serves_base_only(self, rows: torch.Tensor | None = None) -> bool:
        """Whether forward(hidden, rows) computes every row with the base head (no adapter with its own head in it)."""
        step = self.state.full
        return step is None or step.head is None or rows is None or bool((step.head.index_select(0, rows) < 0).all())

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        step = self.state.full
        if step is None or step.head is None or rows is None:
            return self.base(hidden)
        slot_of = step.head.index_select(0, rows)  # [n]
        out = self.base(hidden)
        pool = self.slots.weights["lm_head"]
        for slot in step.head_slots:
            idx = (slot_of == slot).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            x = hidden.index_select(0, idx)
            # two rows at least: a single-row product is a GEMV whose summation order differs from the GEMM's, and a
            # request's greedy output must not depend on how many rows of its adapter share the step
            logits = F.linear(x if x.shape[0] > 1 else x.expand(2, -1), pool[slot])[:x.shape[0]]
            out.index_copy_(0, idx, logits.to(out.dtype))
        return out
