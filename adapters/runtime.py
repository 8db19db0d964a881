"""LoRARuntime: the engine's adapter hook. Owns the registry of servable adapter versions, the host-memory
tier, the paged pool and the LoRA wrappers; the engine calls it to admit, release and prepare steps.

Lives in the engine's process; the HTTP process validates and publishes adapters to the store, then
registers them here by (adapter_id, version) and path (see serve/adapter_routes.py).
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.adapters.composition import Composition, PartInfo, check_parts, merge_lora
from loraplex.adapters.dora import dense_weight, dora_scales
from loraplex.adapters.errors import AdapterError
from loraplex.adapters.full_modules import AdapterEmbedding, AdapterHead, FullModuleStep, ModuleSlots, materialise
from loraplex.adapters.kinds import ServedWeights, load_served_adapter
from loraplex.adapters.lora_linear import LoRALinear, LoRAStepState
from loraplex.adapters.mixlora import ATTENTION, FFN, MixLoRAConfig, MixLoRAWeights
from loraplex.adapters.mixlora_mlp import MixLoRAMLP, MixLoRAStep, MixLoRATables
from loraplex.adapters.ops.cpu import lora_apply_cpu
from loraplex.adapters.ops.meta import build_lora_meta
from loraplex.adapters.ops.mixlora import RoutingGroup
from loraplex.adapters.peft import LORA_MODULES, module_shapes
from loraplex.adapters.pool import AdapterPool, LoRAWeightPool
from loraplex.engine.hugepages import move_to_huge_pages_tensors

logger = logging.getLogger(__name__)

RESIDENCY_REFRESH_S = 1.0  # how stale the per-adapter residency in stats may be
META_MEMO_SIZE = 64  # row maps kept by value (prepare): a batch that keeps its composition reuses its own
MAX_IDLE_MERGED = 64  # merged virtual adapters remembered while no request uses them (their weights: host LRU)

AdapterKey = tuple  # (adapter_id, version) of a registered adapter, or ("merged", Composition) of a virtual one
Source = tuple[AdapterKey, float]  # pages a request's rows read, and the weight of their terms


@dataclass(slots=True)
class RegisteredAdapter:
    name: str
    key: AdapterKey
    path: Path | None  # None: a merged virtual adapter (built from its parts, never read from a file)
    rank: int
    target_modules: tuple[str, ...]
    num_bytes: int
    num_pages: int  # pool pages it takes (a LoRA: its rank; a MixLoRA: attention and every expert)
    mixlora: MixLoRAConfig | None = None
    dora: bool = False  # its last page holds DoRA's per-output-channel scales (adapters/dora.py)
    full_modules: tuple[str, ...] = ()  # its own embed_tokens / lm_head, held in a ModuleSlots slot
    num_requests: int = 0  # added and not finished: the version stays servable while > 0
    retired: bool = False

    @property
    def kind(self) -> str:
        return "mixlora" if self.mixlora is not None else "dora" if self.dora else "lora"

    def modules_of_rows(self) -> tuple[str, ...]:
        """The linears whose plain segmented LoRA op serves this adapter's rows (a MixLoRA's FFN goes through
        its experts instead)."""
        if self.mixlora is None:
            return self.target_modules
        return tuple(m for m in self.target_modules if m in ATTENTION)


def pick_lora_backend(device: torch.device, name: str = "auto"):
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from loraplex.adapters.ops import triton_ops
        if triton_ops.HAS_TRITON:
            return triton_ops.lora_apply_triton
        if name == "triton":
            raise ValueError("the triton LoRA backend needs the triton package")
    return lora_apply_cpu


class LoRARuntime:
    def __init__(self, model: torch.nn.Module, model_config, dtype: torch.dtype, device: torch.device, *,
                 max_lora_rank: int, num_pages: int, max_cpu_loras: int, backend: str = "auto",
                 max_mixlora_adapters: int = 16, max_mixlora_experts: int = 16,
                 max_full_module_adapters: int = 2) -> None:
        self.model_config = model_config
        self.dtype, self.device = dtype, device
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.max_mixlora_experts = max_mixlora_experts
        shapes = module_shapes(model_config)
        if num_pages - 1 < max_lora_rank:
            raise ValueError(f"the LoRA pool ({num_pages - 1} pages) cannot hold one adapter of "
                             f"--max-lora-rank {max_lora_rank}")
        self.weights = LoRAWeightPool(num_pages, model_config.num_hidden_layers, shapes, dtype, device)
        self.pool_bytes = num_pages * LoRAWeightPool.bytes_per_page(model_config.num_hidden_layers, shapes, dtype)
        self.pool = AdapterPool(num_pages, num_slots=max_mixlora_adapters)
        self.mix_tables = MixLoRATables(model_config.num_hidden_layers, model_config.hidden_size,
                                        max_mixlora_adapters, max_mixlora_experts, max_lora_rank, device)
        self.host: OrderedDict[AdapterKey, ServedWeights] = OrderedDict()  # LRU first
        self._residency_at, self._residency_list = -RESIDENCY_REFRESH_S, []
        self.registry: dict[AdapterKey, RegisteredAdapter] = {}
        self._pinned: dict[str, tuple[AdapterKey, ...]] = {}  # request_id -> the adapters it holds pages of
        # merged virtual adapters (adapters/composition.py): entries by key, builds in flight and who waits on them
        self.merged: OrderedDict[AdapterKey, RegisteredAdapter] = OrderedDict()
        self._merging: dict[AdapterKey, concurrent.futures.Future] = {}
        self._merge_waiters: dict[AdapterKey, list] = {}
        self._merge_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.load_latencies_s: collections.deque[float] = collections.deque(maxlen=64)  # the latest loads
        self.state = LoRAStepState(pick_lora_backend(device, backend))
        # the step's row maps by value: a decode batch that keeps its requests and pages steps after step reuses
        # its maps and the layouts derived from them (meta.cache) instead of building ~10 small tensors again
        self._metas_by_value: dict[tuple, object] = {}
        self._linears: dict[tuple[int, str], LoRALinear] = {}
        self.module_slots = ModuleSlots(max_full_module_adapters, model_config.vocab_size, model_config.hidden_size,
                                        dtype, device)
        self._slot_pinned: dict[str, AdapterKey] = {}  # request_id -> the adapter whose module slot it pins
        self._attach(model)
        logger.info("LoRA pool: %d pages of %.2f MiB (%s), max rank %d, host tier %d adapters",
                    num_pages - 1, LoRAWeightPool.bytes_per_page(model_config.num_hidden_layers, shapes, dtype)
                    / 2**20, dtype, max_lora_rank, max_cpu_loras)

    def _attach(self, model: torch.nn.Module) -> None:
        num = 0
        for layer in range(self.model_config.num_hidden_layers):
            for module, parent_name in LORA_MODULES.items():
                parent = model.get_submodule(f"model.layers.{layer}.{parent_name}")
                base = getattr(parent, module)
                wrapper = LoRALinear(base, module, self.weights.a[layer][module], self.weights.b[layer][module],
                                     self.state)
                setattr(parent, module, wrapper)
                self._linears[layer, module] = wrapper
                num += 1
            decoder = model.get_submodule(f"model.layers.{layer}")
            pools = {m: (self.weights.a[layer][m], self.weights.b[layer][m]) for m in FFN}
            if isinstance(decoder.mlp, MixLoRAMLP):  # the trainer attached first
                decoder.mlp.pools, decoder.mlp.state = pools, self.state
            else:
                decoder.mlp = MixLoRAMLP(decoder.mlp, layer, pools, self.state)
        self._embed = AdapterEmbedding(model.model.embed_tokens, self.module_slots, self.state)
        self._head = AdapterHead(model.lm_head, self.module_slots, self.state)
        model.model.embed_tokens, model.lm_head = self._embed, self._head
        logger.info("wrapped %d linear layers for LoRA and %d FFNs for MixLoRA", num,
                    self.model_config.num_hidden_layers)

    # ---- registry (control calls from the HTTP process) -----------------------------------------
    def register_adapter(self, name: str, adapter_id: int, version: int, path: str) -> dict[str, Any]:
        """Make (adapter_id, version) servable: read and validate it into the host tier now, so a bad
        file fails this call instead of a request later. Older versions of the same adapter retire."""
        key = (adapter_id, version)
        existing = self.registry.get(key)
        if existing is not None:  # registered already (maybe retired by a newer version): serve it again
            existing.retired = False
            return {"rank": existing.rank, "target_modules": list(existing.target_modules),
                    "num_bytes": existing.num_bytes, "kind": existing.kind}
        t0 = time.perf_counter()
        weights = self._read(Path(path))
        self.check_servable(weights)
        self._put_host(key, weights)
        mix = weights.config if isinstance(weights, MixLoRAWeights) else None
        self.registry[key] = RegisteredAdapter(name, key, Path(path), weights.rank, weights.target_modules,
                                               weights.num_bytes, weights.num_pages, mix, weights.kind == "dora",
                                               getattr(weights, "full_modules", ()))
        for other in list(self.registry):
            if other[0] == adapter_id and other[1] < version:
                self._retire(other)
        what = "" if mix is None else f", MixLoRA {mix.num_experts} experts {mix.routing_strategy}"
        logger.info("adapter %s v%d registered (rank %d, %s%s) in %.1f ms", name, version, weights.rank,
                    ",".join(weights.target_modules), what, 1000 * (time.perf_counter() - t0))
        return {"rank": weights.rank, "target_modules": list(weights.target_modules), "num_bytes": weights.num_bytes,
                "kind": self.registry[key].kind}

    def limits(self) -> dict[str, int]:
        """What this engine can hold: checked by the HTTP process before it publishes an adapter."""
        return {"pool_pages": self.pool.allocator.num_usable, "max_lora_rank": self.max_lora_rank,
                "max_mixlora_experts": self.max_mixlora_experts, "max_mixlora_adapters": self.pool.num_slots,
                "max_full_module_adapters": self.module_slots.num_slots}

    def check_servable(self, weights: ServedWeights) -> None:
        check_limits(weights, self.limits())

    def unregister_adapter(self, adapter_id: int, version: int | None = None) -> int:
        """Retire every version of an adapter (deleted), or just `version` (a cluster replica dropping one it
        has not served lately): running requests finish on it first."""
        keys = [k for k in self.registry if k[0] == adapter_id and version in (None, k[1])]
        for key in keys:
            self._retire(key)
        return len(keys)

    def adapter_state(self) -> dict[str, Any]:
        out = {}
        for key, entry in self.registry.items():
            tier = "device" if self.pool.is_resident(key) else "host" if key in self.host else "store"
            out[f"{key[0]}:{key[1]}"] = {"name": entry.name, "version": key[1], "tier": tier,
                                         "running": self.pool.pin_count(key), "requests": entry.num_requests,
                                         "retired": entry.retired}
        return out

    def _retire(self, key: AdapterKey) -> None:
        entry = self.registry.get(key)
        if entry is None:
            return
        entry.retired = True
        if entry.num_requests == 0:
            self._drop(key)

    def _drop(self, key: AdapterKey) -> None:
        self.registry.pop(key, None)
        self.host.pop(key, None)
        self.pool.retire(key)
        self.module_slots.retire(key)
        for merged in [k for k in self.merged if key in k[1].adapter_keys()]:  # unused: their parts have no request
            self._drop_merged(merged)

    def _read(self, path: Path) -> ServedWeights:
        weights = load_served_adapter(path, self.model_config, self.max_lora_rank, dtype=self.dtype)
        if weights.kind == "dora":  # its norms against the weights served here, once per read
            weights.dora_scales = dora_scales(weights, lambda layer, module: self._linears[layer, module].base,
                                              self.dtype, self.device)
        if getattr(weights, "full", None):  # its own embedding / head, whole, once per read
            weights.full_weights = materialise(weights, self._base_full_weight, self.dtype)
        return weights

    def _base_full_weight(self, module: str) -> torch.Tensor:
        if module == "embed_tokens":
            return self._embed.base.weight.float()
        return dense_weight(self._head.base, self.dtype, self.device)

    def _put_host(self, key: AdapterKey, weights: ServedWeights) -> None:
        self.host[key] = weights
        self.host.move_to_end(key)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)

    def _load_into(self, key: AdapterKey, pages: list[int], slot: int | None = None) -> None:
        t0 = time.perf_counter()
        weights = self.host.get(key)
        if weights is None:  # evicted from the host tier too: back from the store (admit rebuilds a merged one first)
            weights = self._read(self.registry[key].path)
        self._put_host(key, weights)
        if isinstance(weights, MixLoRAWeights):
            assert slot is not None
            self.weights.write(pages, weights.pool_tensors())
            self.mix_tables.write(slot, weights.router, pages, weights.expert_offsets, weights.config.rank(True))
        else:
            self.weights.write(pages, weights.pool_tensors())
        self.load_latencies_s.append(time.perf_counter() - t0)

    # ---- the engine's hook -------------------------------------------------------------------
    def add_request(self, request) -> None:
        if not request.adapter_id:
            return
        parts = self._parts(request)
        entries = []
        for key in parts:
            entry = self.registry.get(key)
            if entry is None or entry.retired:
                raise AdapterError(f"adapter {key[0]} v{key[1]} is not loaded")
            entries.append(entry)
        mix = request.adapter_mix
        if mix is not None:
            check_parts(mix, [PartInfo(e.name, e.kind, e.rank, e.num_pages, bool(e.full_modules)) for e in entries],
                        self.pool.allocator.num_usable)
        for entry in entries:
            entry.num_requests += 1
        if mix is not None and mix.materialised:
            self._ensure_merged(request)

    @staticmethod
    def _parts(request) -> tuple[AdapterKey, ...]:
        """The registered adapters a request uses (each stays servable until it finishes)."""
        mix = request.adapter_mix
        return ((request.adapter_id, request.adapter_version),) if mix is None else mix.adapter_keys()

    @staticmethod
    def _sources(request) -> tuple[Source, ...]:
        """What the request's rows read from the pool: its adapter; the parts of a linear combination, each with
        its weight; or the merged virtual adapter of any other method."""
        mix = request.adapter_mix
        if mix is None:
            return (((request.adapter_id, request.adapter_version), 1.0),)
        if mix.materialised:
            return ((merged_key(mix), 1.0),)
        return tuple(((a, v), w) for a, v, w in mix.parts)

    def _entry(self, key: AdapterKey) -> RegisteredAdapter:
        entry = self.registry.get(key)
        return self.merged[key] if entry is None else entry

    def admit(self, request) -> bool:
        """Waiting -> running: pin the pages of every adapter its rows read, loading them (and evicting unpinned
        adapters); all or none."""
        if not request.adapter_id:
            return True
        if request.request_id in self._pinned:
            return True
        sources = self._sources(request)
        if request.adapter_mix is not None and request.adapter_mix.materialised and not self._merged_ready(
                sources[0][0]):
            self._ensure_merged(request)  # evicted from the host tier since: built again, off the loop
            return False
        pinned: list[AdapterKey] = []
        for key, _ in sources:
            entry = self._entry(key)
            pages = self.pool.acquire(key, entry.num_pages, lambda p, slot=None, key=key: self._load_into(key, p, slot),
                                      slot=entry.mixlora is not None)
            if pages is None:
                for k in pinned:
                    self.pool.release(k)
                return False
            pinned.append(key)
        full = [key for key, _ in sources if self._entry(key).full_modules]
        if full:  # one adapter (check_parts): its embedding / head into a module slot, all or nothing with its pages
            key = full[0]
            if self.module_slots.acquire(key, lambda: self._full_weights(key)) is None:
                for k in pinned:
                    self.pool.release(k)
                return False
            self._slot_pinned[request.request_id] = key
        self._pinned[request.request_id] = tuple(pinned)
        return True

    def _full_weights(self, key: AdapterKey) -> dict[str, torch.Tensor]:
        weights = self.host.get(key)
        if weights is None:  # evicted from the host tier too: back from the store
            weights = self._read(self.registry[key].path)
            self._put_host(key, weights)
        return weights.full_weights

    def release(self, request, finished: bool) -> None:
        """Running -> preempted (finished=False) or finished/aborted (finished=True)."""
        for key in self._pinned.pop(request.request_id, ()):
            self.pool.release(key)
        slot_key = self._slot_pinned.pop(request.request_id, None)
        if slot_key is not None:
            self.module_slots.release(slot_key)
        if finished and request.adapter_id:
            if request.waiting_for_adapter:
                self._merge_waiters.get(merged_key(request.adapter_mix), []).remove(request)
                request.waiting_for_adapter = False
            for key in self._parts(request):
                entry = self.registry.get(key)
                if entry is not None:
                    entry.num_requests -= 1
                    if entry.retired and entry.num_requests == 0:
                        self._drop(entry.key)

    # ---- merged virtual adapters (built off the step loop) ------------------------------------
    def _merged_ready(self, key: AdapterKey) -> bool:
        return key in self.merged and (self.pool.is_resident(key) or key in self.host)

    def _ensure_merged(self, request) -> None:
        """Make the request wait (Request.waiting_for_adapter) until its merged adapter is built; start that build
        unless one is running. The parts' weights are taken from the host tier here, on the loop's thread."""
        mix = request.adapter_mix
        key = merged_key(mix)
        if self._merged_ready(key):
            self.merged.move_to_end(key)
            return
        if key not in self._merging:
            parts = [(self.host.get((a, v)) or self.registry[a, v].path, w) for a, v, w in mix.parts]
            if self._merge_pool is None:
                self._merge_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lora-merge")
            self._merging[key] = self._merge_pool.submit(self._build_merged, parts, mix.without_scale())
        self._merge_waiters.setdefault(key, []).append(request)
        request.waiting_for_adapter = True

    def _build_merged(self, parts: list[tuple[ServedWeights | Path, float]], mix: Composition) -> ServedWeights:
        t0 = time.perf_counter()
        loaded = [(self._read(w) if isinstance(w, Path) else w, weight) for w, weight in parts]
        merged = merge_lora(loaded, mix)
        logger.info("merged adapter %s built (rank %d, %s) in %.1f ms", mix.describe(), merged.rank,
                    ",".join(merged.target_modules), 1000 * (time.perf_counter() - t0))
        return merged

    @property
    def has_pending(self) -> bool:
        return bool(self._merging)

    def poll(self, wait_s: float = 0.0) -> list[tuple[str, str]]:
        """Merged adapters built since the last step: into the host tier, their requests admissible. Returns
        (request_id, error) for the requests of a build that failed."""
        if wait_s > 0 and self._merging:
            concurrent.futures.wait(list(self._merging.values()), timeout=wait_s,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        failed = []
        for key, future in list(self._merging.items()):
            if not future.done():
                continue
            del self._merging[key]
            waiters = self._merge_waiters.pop(key, [])
            for request in waiters:
                request.waiting_for_adapter = False
            if future.exception() is not None:
                failed.extend((r.request_id, f"merging adapters failed: {future.exception()}") for r in waiters)
                continue
            weights = future.result()
            self._put_host(key, weights)
            self.merged[key] = RegisteredAdapter(key[1].describe(), key, None, weights.rank, weights.target_modules,
                                                 weights.num_bytes, weights.num_pages)
            self.merged.move_to_end(key)
            self._forget_idle_merged()
        return failed

    def _forget_idle_merged(self) -> None:
        idle = [k for k in self.merged if self.pool.pin_count(k) == 0 and k not in self._merge_waiters]
        for key in idle[:max(0, len(self.merged) - MAX_IDLE_MERGED)]:
            self._drop_merged(key)

    def _drop_merged(self, key: AdapterKey) -> None:
        self.merged.pop(key, None)
        self.host.pop(key, None)
        self.pool.retire(key)

    def prepare(self, scheduled, batch) -> None:
        """Group the step's rows by what they read: decodes reading the same pages with the same weights form one
        segment (each row with its own lora_scale), each prefill chunk its own (contiguous rows). Each target module
        gets the segments' pages of the adapters that target it; modules no adapter of the step targets are skipped
        (PEFT's default q_proj/v_proj adapters cost nothing on the other five linears)."""
        segments: list[tuple[tuple[Source, ...], list[int], list[float]]] = []
        decodes: dict[tuple[Source, ...], tuple[list[int], list[float]]] = {}
        row = 0
        for s in scheduled:
            request = s.request
            if request.adapter_id:
                sources = self._sources(request)
                scale = 1.0 if request.adapter_mix is None else request.adapter_mix.scale
                if s.num_new_tokens == 1:
                    rows, scales = decodes.setdefault(sources, ([], []))
                    rows.append(row)
                    scales.append(scale)
                else:
                    segments.append((sources, list(range(row, row + s.num_new_tokens)), [scale] * s.num_new_tokens))
            row += s.num_new_tokens
        segments.extend((sources, rows, scales) for sources, (rows, scales) in decodes.items())
        metas: dict[str, object] = {}
        by_selection: dict[tuple, object] = {}  # modules reading the same pages share a meta
        for module in LORA_MODULES:
            selection, specs = [], []
            for i, (sources, rows, scales) in enumerate(segments):
                used = tuple(j for j, (key, _) in enumerate(sources) if module in self._entry(key).modules_of_rows())
                if not used:
                    continue
                pages, weights = [], []
                for j in used:
                    key, weight = sources[j]
                    key_pages = self._pages_of(key)
                    pages.extend(key_pages)
                    weights.extend([weight] * len(key_pages))
                selection.append((i, used))
                specs.append((rows, pages, None if all(w == 1.0 for w in weights) else weights,
                              None if all(v == 1.0 for v in scales) else scales))
            if not specs:
                continue
            key = tuple(selection)
            if key not in by_selection:
                by_selection[key] = self._meta(row, specs)
            metas[module] = by_selection[key]
        self.state.metas = metas
        self.state.dora = self._dora_step(segments)
        self.state.full = self._full_step(segments, row)
        self.state.mix = self._mix_step([(sources[0][0], rows) for sources, rows, _ in segments
                                         if len(sources) == 1])
        batch.adapter_metadata = metas or self.state.mix or None

    def _meta(self, num_tokens: int, specs: list[tuple]):
        """build_lora_meta's map of these rows and pages, the same object again while they stay the same (what a
        meta holds and caches is a function of these values only; the pages' contents are read at apply time)."""
        key = (num_tokens, *((tuple(rows), tuple(pages), None if w is None else tuple(w),
                              None if r is None else tuple(r)) for rows, pages, w, r in specs))
        meta = self._metas_by_value.get(key)
        if meta is None:
            if len(self._metas_by_value) >= META_MEMO_SIZE:
                self._metas_by_value.clear()
            meta = self._metas_by_value[key] = build_lora_meta(num_tokens, specs, self.device)
        return meta

    def _pages_of(self, key: AdapterKey) -> list[int]:
        """The pages the plain LoRA op reads for this adapter: a LoRA's rank-rows (a DoRA's scale page is the one
        after them); a MixLoRA's attention rank-rows."""
        entry = self._entry(key)
        pages, mix = self.pool.pages(key), entry.mixlora
        return pages[:entry.rank] if mix is None else pages[:mix.r]

    def _full_step(self, segments: list[tuple[tuple[Source, ...], list[int], list[float]]], num_tokens: int
                   ) -> FullModuleStep | None:
        """The rows of adapters with their own embedding / head, and the slot each reads."""
        embed_rows: list[int] = []
        embed_slots: list[int] = []
        head: list[tuple[list[int], int]] = []
        for sources, rows, _ in segments:
            entry = self._entry(sources[0][0])
            if not entry.full_modules:
                continue
            slot = self.module_slots.slot(entry.key)
            if "embed_tokens" in entry.full_modules:
                embed_rows.extend(rows)
                embed_slots.extend([slot] * len(rows))
            if "lm_head" in entry.full_modules:
                head.append((rows, slot))
        if not embed_rows and not head:
            return None

        def as_tensor(data) -> torch.Tensor:
            return torch.tensor(data, dtype=torch.int64, device=self.device)
        row_slot = None
        if head:
            slots = [-1] * num_tokens
            for rows, slot in head:
                for r in rows:
                    slots[r] = slot
            row_slot = as_tensor(slots)
        return FullModuleStep((as_tensor(embed_rows), as_tensor(embed_slots)) if embed_rows else None, row_slot,
                              tuple(sorted({slot for _, slot in head})))

    def _dora_step(self, segments: list[tuple[tuple[Source, ...], list[int], list[float]]]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module, the rows of DoRA adapters targeting it and each row's scale page."""
        by_module: dict[str, tuple[list[int], list[int]]] = {}
        for sources, rows, _ in segments:
            entry = self._entry(sources[0][0])
            if not entry.dora:
                continue
            page = self.pool.pages(entry.key)[entry.rank]
            for module in entry.target_modules:
                module_rows, pages = by_module.setdefault(module, ([], []))
                module_rows.extend(rows)
                pages.extend([page] * len(rows))
        shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        out = {}
        for module, (rows, pages) in by_module.items():
            sig = (tuple(rows), tuple(pages))
            if sig not in shared:
                shared[sig] = (torch.tensor(rows, dtype=torch.int64, device=self.device),
                               torch.tensor(pages, dtype=torch.int64, device=self.device))
            out[module] = shared[sig]
        return out

    def _mix_step(self, segments: list[tuple[AdapterKey, list[int]]]) -> MixLoRAStep | None:
        rows: list[int] = []
        slots: list[int] = []
        num_experts: list[int] = []
        groups: list[RoutingGroup] = []
        modules: set[str] = set()
        for key, seg_rows in segments:
            entry = self._entry(key)
            mix = entry.mixlora
            if mix is None:
                continue
            modules.update(m for m in entry.target_modules if m in FFN)
            start = len(rows)
            rows.extend(seg_rows)
            slots.extend([self.pool.slot(key)] * len(seg_rows))
            num_experts.extend([mix.num_experts] * len(seg_rows))
            params = (mix.routing_strategy, mix.top_k, mix.top_p, mix.temperature)
            last = groups[-1] if groups else None
            if last is not None and (last.strategy, last.top_k, last.top_p, last.temperature) == params:
                groups[-1] = RoutingGroup(last.start, len(rows), *params)
            else:
                groups.append(RoutingGroup(start, len(rows), *params))
        if not rows:
            return None

        def as_tensor(data) -> torch.Tensor:
            return torch.tensor(data, dtype=torch.int64, device=self.device)
        counts = as_tensor(num_experts)
        mask = torch.arange(self.mix_tables.max_experts, device=self.device).unsqueeze(0) < counts.unsqueeze(1)
        return MixLoRAStep(self.mix_tables, as_tensor(rows), as_tensor(slots), mask, counts, groups,
                           frozenset(modules))

    def call(self, method: str, args: tuple) -> Any:
        if method not in ("register_adapter", "unregister_adapter", "adapter_state", "limits"):
            raise ValueError(f"unknown adapter call {method!r}")
        return getattr(self, method)(*args)

    def adapter_name(self, key: AdapterKey) -> str | None:
        entry = self.registry.get(key)
        return None if entry is None else entry.name

    def stats(self) -> dict[str, Any]:
        return {"pages_used": self.pool.num_used_pages, "pages_free": self.pool.num_free_pages,
                "resident_device": len(self.pool.resident), "resident_host": len(self.host),
                "registered": len(self.registry), "loads": self.pool.num_loads,
                "evictions": self.pool.num_evictions, "recent_load_latencies_s": list(self.load_latencies_s),
                "residency": self._residency()}

    def _residency(self) -> list[tuple[str, int, str, int]]:
        """Per registered version: name, version, tier, rank (llm-d's residency scorer reads these). Rebuilt at
        most once per RESIDENCY_REFRESH_S: stats go out with every step's outputs, and a metrics scrape does not
        need a per-step picture of hundreds of adapters."""
        now = time.monotonic()
        if now - self._residency_at >= RESIDENCY_REFRESH_S:
            self._residency_at = now
            self._residency_list = [(e.name, key[1], "device" if self.pool.is_resident(key) else
                                     "host" if key in self.host else "store", e.rank)
                                    for key, e in self.registry.items() if not e.retired]
        return self._residency_list


def merged_key(mix: Composition) -> AdapterKey:
    """The pool / host-tier key of a composition's merged virtual adapter (its lora_scale applies per row)."""
    return ("merged", mix.without_scale())


def check_limits(weights: ServedWeights, limits: dict[str, int]) -> None:
    """AdapterError (400) for an adapter this engine could never hold."""
    if weights.num_pages > limits["pool_pages"]:
        raise AdapterError(f"the adapter needs {weights.num_pages} pool pages (rank-rows); this server's LoRA pool "
                           f"has {limits['pool_pages']} (--lora-pool-pages / --lora-pool-bytes)")
    if getattr(weights, "full", None) and not limits.get("max_full_module_adapters", 0):
        raise AdapterError(f"the adapter has its own {' and '.join(weights.full_modules)}; this server holds none "
                           "(--max-full-module-adapters 0)", param="modules_to_save")
    if isinstance(weights, MixLoRAWeights) and weights.config.num_experts > limits["max_mixlora_experts"]:
        raise AdapterError(f"num_experts {weights.config.num_experts} exceeds this server's "
                           f"--max-mixlora-experts {limits['max_mixlora_experts']}", param="num_experts")


def create_lora_runtime(engine, args) -> LoRARuntime:
    """The engine's hook factory (picklable: the engine process calls it after loading the model)."""
    runner = engine.runner
    shapes = module_shapes(engine.model_config)
    per_page = LoRAWeightPool.bytes_per_page(engine.model_config.num_hidden_layers, shapes, runner.dtype)
    num_pages = args.lora_pool_pages or max(args.max_lora_rank, args.lora_pool_bytes // per_page) + 1
    runtime = LoRARuntime(runner.model, engine.model_config, runner.dtype, runner.device,
                          max_lora_rank=args.max_lora_rank, num_pages=num_pages,
                          max_cpu_loras=args.max_cpu_loras or max(args.max_loras, 2 * num_pages // args.max_lora_rank),
                          max_mixlora_adapters=args.max_mixlora_adapters,
                          max_mixlora_experts=args.max_mixlora_experts,
                          max_full_module_adapters=args.max_full_module_adapters)
    if args.cpu_huge_pages and runner.device.type == "cpu":
        # a decode step reads its adapters' pages after the weights have pushed them out of the caches, a few KiB per
        # module and layer: on huge pages those reads miss the TLB far less (~10% of their time here). The fresh pool
        # is zeros: nothing is copied, pages are backed as adapters are written
        move_to_huge_pages_tensors(runtime.weights.tensors(), "LoRA pool", zeros=True, min_storage_bytes=0)
    return runtime
