"""Paged KV block manager: ref-counted fixed-size blocks, LRU free list, prefix caching by chained
hashes of full blocks salted with the adapter (after vLLM v1's KVCacheManager and nano-vllm's
BlockManager). Pure Python: it hands out block ids; the runner owns the tensors."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from loraplex.engine.core.request import Request


class BlockHash(NamedTuple):
    """Key of one full block. `hash_value` chains the parent's; the token ids and salt are kept in
    the key so a 64-bit collision can never map two different blocks onto each other."""
    hash_value: int
    token_ids: tuple[int, ...]
    salt: tuple


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None  # set once the block is full and computed

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt}, cached={self.block_hash is not None})"


@dataclass(slots=True)
class PrefixCacheStats:
    """Cumulative counters; `queries` and `hits` count tokens, `requests` counts admissions."""
    requests: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def hash_block_tokens(parent: BlockHash | None, token_ids: tuple[int, ...], salt: tuple) -> BlockHash:
    parent_value = parent.hash_value if parent is not None else 0
    return BlockHash(hash((parent_value, token_ids, salt)), token_ids, salt)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Blocks with ref_cnt 0 are free. Free blocks that still hold a cached prefix stay in the hash
    map until they are handed out again; the free list pops its head, so the least recently freed
    cached block is evicted first, and uncached blocks are put at the head to be reused before any
    cached one."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_block_hash_to_block: dict[BlockHash, KVCacheBlock] = {}
        self.req_to_blocks: dict[str, list[int]] = {}
        self.req_to_block_hashes: dict[str, list[BlockHash]] = {}
        self.num_cached_block: dict[str, int] = {}  # leading blocks of a request already hashed
        self.prefix_cache_stats = PrefixCacheStats()

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_block_hash_to_block)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        return list(self.req_to_blocks.get(request_id, ()))

    # ---- prefix cache --------------------------------------------------------------------------
    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The request's chained block hashes, extended to cover its first `num_blocks` full blocks."""
        hashes = self.req_to_block_hashes.setdefault(request.request_id, [])
        if len(hashes) < num_blocks:
            bs = self.block_size
            token_ids = request.all_token_ids
            parent = hashes[-1] if hashes else None
            for i in range(len(hashes), num_blocks):
                parent = hash_block_tokens(parent, tuple(token_ids[i * bs:(i + 1) * bs]), request.cache_salt)
                hashes.append(parent)
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of full blocks, as (block_ids, num_computed_tokens). Only the
        first num_tokens - 1 tokens are matched so that the last token is always recomputed (its
        logits are needed). Takes no references: pass the ids to `allocate_slots`."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return [], 0  # a cached prefix has no logits: its prompt logprobs could not be computed
        max_blocks = (request.num_tokens - 1) // self.block_size
        computed: list[int] = []
        for block_hash in self._block_hashes(request, max_blocks)[:max_blocks]:
            block = self.cached_block_hash_to_block.get(block_hash)
            if block is None:
                break
            computed.append(block.block_id)
        return computed, len(computed) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose K/V are computed (within num_computed_tokens)."""
        if not self.enable_prefix_caching:
            return
        block_ids = self.req_to_blocks.get(request.request_id)
        if block_ids is None:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(block_ids))
        start = self.num_cached_block.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            block = self.blocks[block_ids[i]]
            if block.block_hash is not None:
                continue  # a prefix hit: already cached
            # Another request may have computed the same block concurrently; keep the first copy.
            if hashes[i] not in self.cached_block_hash_to_block:
                block.block_hash = hashes[i]
                self.cached_block_hash_to_block[hashes[i]] = block
        self.num_cached_block[request.request_id] = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents, just not their hashes)."""
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()

    # ---- allocation ----------------------------------------------------------------------------
    def _num_blocks_to_allocate(self, request: Request, num_new_tokens: int,
                                new_computed_blocks: list[int]) -> tuple[int, int]:
        """(fresh blocks needed, free blocks the computed ones take off the free list)."""
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_have = len(self.req_to_blocks.get(request.request_id, ())) + len(new_computed_blocks)
        num_touched_free = sum(1 for b in new_computed_blocks if self.blocks[b].ref_cnt == 0)
        return max(0, num_required - num_have), num_touched_free

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Free blocks `allocate_slots(request, num_new_tokens)` would take."""
        return self._num_blocks_to_allocate(request, num_new_tokens, [])[0]

    def can_allocate(self, request: Request, num_new_tokens: int,
                     new_computed_blocks: list[int] | None = None) -> bool:
        num_new, num_touched_free = self._num_blocks_to_allocate(request, num_new_tokens,
                                                                  new_computed_blocks or [])
        return num_new + num_touched_free <= self.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> list[int] | None:
        """Make room for request.num_computed_tokens + len(new_computed_blocks) * block_size +
        num_new_tokens tokens. `new_computed_blocks` (from `get_computed_blocks`, only for a request
        holding no blocks, with num_computed_tokens not yet advanced past them) are referenced and
        put first. Returns the request's full block table, or None (changing nothing) when there
        are not enough free blocks."""
        new_computed_blocks = new_computed_blocks or []
        req_id = request.request_id
        if new_computed_blocks and self.req_to_blocks.get(req_id):
            raise ValueError(f"request {req_id} already holds blocks; computed blocks go first")
        num_new, num_touched_free = self._num_blocks_to_allocate(request, num_new_tokens, new_computed_blocks)
        if num_new + num_touched_free > self.num_free_blocks:
            return None

        if req_id not in self.req_to_blocks and self.enable_prefix_caching:
            stats = self.prefix_cache_stats
            stats.requests += 1
            stats.queries += request.num_tokens
            stats.hits += len(new_computed_blocks) * self.block_size
        block_ids = self.req_to_blocks.setdefault(req_id, [])
        for block_id in new_computed_blocks:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free_block_queue[block_id]
            block.ref_cnt += 1
            block_ids.append(block_id)
        if new_computed_blocks:
            self.num_cached_block[req_id] = len(new_computed_blocks)
        for _ in range(num_new):
            block_ids.append(self._pop_free_block().block_id)
        return list(block_ids)

    def _pop_free_block(self) -> KVCacheBlock:
        block_id, _ = self.free_block_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached prefix
            if self.cached_block_hash_to_block.get(block.block_hash) is block:
                del self.cached_block_hash_to_block[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def free(self, request: Request) -> None:
        """Drop the request's references, tail block first so a prefix's tail is evicted before its
        head. Cached blocks keep their hash and can be hit again until they are reallocated."""
        req_id = request.request_id
        self.req_to_block_hashes.pop(req_id, None)
        self.num_cached_block.pop(req_id, None)
        for block_id in reversed(self.req_to_blocks.pop(req_id, ())):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue[block_id] = None
                if block.block_hash is None:
                    self.free_block_queue.move_to_end(block_id, last=False)
