"""KVCacheManager: block accounting, prefix caching (salted chained hashes), LRU eviction."""
from loraplex.engine.core.kv_cache import KVCacheManager
from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import SamplingParams

BS = 4


def make_request(rid, tokens, adapter_id=0, adapter_version=0):
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), adapter_id=adapter_id,
                   adapter_version=adapter_version)


def compute(kv, request, computed_blocks=None, num_computed=0):
    """Allocate and 'run' the whole prompt, as the scheduler would, then cache its full blocks."""
    request.num_computed_tokens = 0
    block_ids = kv.allocate_slots(request, request.num_tokens - num_computed, computed_blocks)
    assert block_ids is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return block_ids


def test_allocate_and_free_counts():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(10))
    ids = kv.allocate_slots(a, 10)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert kv.num_free_blocks == 5 and kv.get_block_ids("a") == ids
    assert abs(kv.usage - 3 / 8) < 1e-9
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2) == ids  # 12 tokens still fit in 3 blocks
    assert len(kv.allocate_slots(a, 3)) == 4  # 13 tokens need a fourth
    kv.free(a)
    assert kv.num_free_blocks == 8 and kv.get_block_ids("a") == []
    kv.free(a)  # idempotent
    assert kv.num_free_blocks == 8


def test_allocate_fails_without_side_effects():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a, b = make_request("a", range(8)), make_request("b", range(100, 108))
    assert kv.allocate_slots(a, 8) is not None
    assert not kv.can_allocate(b, 8)
    assert kv.allocate_slots(b, 8) is None
    assert kv.num_free_blocks == 1 and kv.get_block_ids("b") == []
    kv.free(a)
    assert kv.num_free_blocks == 3


def test_prefix_hit_shares_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", range(10))
    a_ids = compute(kv, a)
    assert kv.num_cached_blocks == 2  # two full blocks; the partial third is not cached
    b = make_request("b", list(range(8)) + [50, 51, 52])
    blocks, num_computed = kv.get_computed_blocks(b)
    assert blocks == a_ids[:2] and num_computed == 8
    b_ids = kv.allocate_slots(b, b.num_tokens - num_computed, blocks)
    assert b_ids[:2] == a_ids[:2] and len(b_ids) == 3 and b_ids[2] not in a_ids
    assert kv.num_free_blocks == 10 - 4
    assert kv.prefix_cache_stats.hits == 8 and kv.prefix_cache_stats.requests == 2
    kv.free(a)
    assert kv.num_free_blocks == 10 - 3  # shared blocks are still held by b
    kv.free(b)
    assert kv.num_free_blocks == 10


def test_last_token_is_always_recomputed():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    compute(kv, make_request("a", range(8)))
    blocks, num_computed = kv.get_computed_blocks(make_request("b", range(8)))
    assert len(blocks) == 1 and num_computed == 4
    blocks, num_computed = kv.get_computed_blocks(make_request("c", range(9)))
    assert len(blocks) == 2 and num_computed == 8


def test_different_salt_never_shares():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    compute(kv, make_request("a", range(10), adapter_id=1, adapter_version=1))
    assert kv.get_computed_blocks(make_request("b", range(10), adapter_id=1, adapter_version=2)) == ([], 0)
    assert kv.get_computed_blocks(make_request("c", range(10), adapter_id=2, adapter_version=1)) == ([], 0)
    assert kv.get_computed_blocks(make_request("d", range(10))) == ([], 0)
    assert kv.get_computed_blocks(make_request("e", range(10), adapter_id=1, adapter_version=1))[1] == 8


def test_chained_hash_needs_same_parent():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    compute(kv, make_request("a", list(range(4)) + list(range(10, 14)) + [0]))
    # same second block but a different first one: no hit at all
    b = make_request("b", list(range(4, 8)) + list(range(10, 14)) + [0])
    assert kv.get_computed_blocks(b) == ([], 0)


def test_freed_cached_block_is_reused_by_a_later_hit():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", range(9))
    a_ids = compute(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 6 and kv.num_cached_blocks == 2
    b = make_request("b", range(9))
    blocks, num_computed = kv.get_computed_blocks(b)
    assert blocks == a_ids[:2] and num_computed == 8
    b_ids = compute(kv, b, blocks, num_computed)
    assert b_ids[:2] == a_ids[:2]
    assert kv.num_free_blocks == 6 - 3  # the two hit blocks left the free list
    kv.free(b)
    assert kv.num_free_blocks == 6


def test_eviction_is_lru_and_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", range(13))  # 3 full blocks + 1 partial
    a_ids = compute(kv, a)
    kv.free(a)
    assert kv.num_cached_blocks == 3
    # one fresh block: the uncached partial block is reused first, nothing is evicted
    c = make_request("c", range(100, 103))
    assert kv.allocate_slots(c, 3) == [a_ids[3]]
    assert kv.num_cached_blocks == 3
    # the next one evicts a's tail block, so a's prefix still hits on two blocks
    d = make_request("d", range(200, 203))
    assert kv.allocate_slots(d, 3) == [a_ids[2]]
    assert kv.num_cached_blocks == 2
    assert kv.get_computed_blocks(make_request("e", range(13)))[1] == 8
    kv.free(c)
    kv.free(d)
    # a request needing every block evicts the whole cache
    f = make_request("f", range(300, 316))
    compute(kv, f)
    assert kv.get_computed_blocks(make_request("g", range(13))) == ([], 0)
    kv.free(f)
    assert kv.num_free_blocks == 4


def test_blocks_are_hashed_only_once_computed():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", range(12))
    kv.allocate_slots(a, 12)
    kv.cache_full_blocks(a)
    assert kv.num_cached_blocks == 0
    a.num_computed_tokens = 6  # a chunk: one block complete
    kv.cache_full_blocks(a)
    assert kv.num_cached_blocks == 1
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)
    assert kv.num_cached_blocks == 3
    kv.free(a)
    assert kv.num_free_blocks == 6


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", range(9))
    compute(kv, a)
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", range(9))) == ([], 0)
    kv.free(a)
    assert kv.num_free_blocks == 6


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", range(9))
    compute(kv, a)
    kv.reset_prefix_cache()
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", range(9))) == ([], 0)
    kv.free(a)
    assert kv.num_free_blocks == 6


def test_prefix_cache_stats():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = make_request("a", range(9))
    compute(kv, a)
    b = make_request("b", range(9))
    blocks, n = kv.get_computed_blocks(b)
    compute(kv, b, blocks, n)
    stats = kv.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (2, 18, 8)
    assert abs(stats.hit_rate - 8 / 18) < 1e-9
