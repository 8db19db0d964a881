"""The page allocator and residency policy (pure Python, no tensors), and the pool's tensor writes."""
import pytest
import torch

from loraplex.adapters.pool import AdapterPool, LoRAWeightPool, PageAllocator


def test_page_zero_is_never_handed_out():
    alloc = PageAllocator(9)
    assert alloc.num_usable == 8 == alloc.num_free
    pages = alloc.allocate(8)
    assert sorted(pages) == list(range(1, 9)) and alloc.allocate(1) is None
    alloc.free(pages[:3])
    assert alloc.num_free == 3
    with pytest.raises(ValueError):
        alloc.free([0])
    with pytest.raises(ValueError):
        PageAllocator(1)


def test_mixed_ranks_share_pages_without_padding():
    pool, loads = AdapterPool(1 + 4 + 8 + 64), []
    for key, rank in (("r4", 4), ("r8", 8), ("r64", 64)):
        pages = pool.acquire(key, rank, loads.append)
        assert len(pages) == rank
    assert pool.num_free_pages == 0 and pool.num_used_pages == 76 and len(loads) == 3
    assert len({p for k in ("r4", "r8", "r64") for p in pool.pages(k)}) == 76


def test_lru_eviction_skips_pinned_and_follows_use_order():
    evicted = []
    pool = AdapterPool(1 + 24, on_evict=evicted.append)
    for key in "abc":
        pool.acquire(key, 8, lambda p: None)
    pool.release("a")
    pool.release("c")
    pool.acquire("a", 8, lambda p: None)  # a is pinned again and most recently used
    pool.release("a")
    # b is pinned; the least recently used unpinned one is c, then a
    assert pool.acquire("d", 8, lambda p: None) is not None and evicted == ["c"]
    assert pool.acquire("e", 8, lambda p: None) is not None and evicted == ["c", "a"]
    assert pool.acquire("f", 8, lambda p: None) is None  # b, d, e pinned: no room, nothing changed
    assert evicted == ["c", "a"] and pool.num_free_pages == 0
    assert not pool.can_acquire("f", 8) and pool.can_acquire("b", 8)


def test_reacquire_resident_does_not_reload():
    pool, loads = AdapterPool(17), []
    pool.acquire("a", 8, loads.append)
    pool.acquire("a", 8, loads.append)
    assert len(loads) == 1 and pool.pin_count("a") == 2
    pool.release("a")
    pool.release("a")
    with pytest.raises(ValueError):
        pool.release("a")


def test_failed_load_frees_its_pages():
    pool = AdapterPool(17)

    def boom(pages):
        raise OSError("disk gone")
    with pytest.raises(OSError):
        pool.acquire("a", 8, boom)
    assert pool.num_free_pages == 16 and not pool.is_resident("a")


def test_retire_waits_for_the_last_pin():
    pool = AdapterPool(17)
    pool.acquire("v1", 8, lambda p: None)
    pool.retire("v1")
    assert pool.is_resident("v1")  # still running on it
    pool.release("v1")
    assert not pool.is_resident("v1") and pool.num_free_pages == 16
    pool.acquire("v2", 4, lambda p: None)
    pool.release("v2")
    pool.retire("v2")
    assert not pool.is_resident("v2")
    with pytest.raises(ValueError):
        pool.acquire("big", 17, lambda p: None)


def test_weight_pool_write_zeroes_untargeted_modules_and_rank_padding():
    shapes = {"q_proj": (6, 6), "down_proj": (10, 6)}
    w = LoRAWeightPool(9, 2, shapes, torch.float32, "cpu")
    assert LoRAWeightPool.bytes_per_page(2, shapes, torch.float32) == 2 * (12 + 16) * 4
    for t in w.a[0].values():
        t.fill_(7.0)  # stale data from an evicted adapter
    for t in w.b[0].values():
        t.fill_(7.0)
    a, b = torch.randn(2, 6), torch.randn(6, 2)
    w.write([3, 5, 8], {(0, "q_proj"): (a, b)})  # rank 3 pages, this module has r_m = 2
    assert torch.equal(w.a[0]["q_proj"][[3, 5]], a) and torch.equal(w.b[0]["q_proj"][[3, 5]], b.t())
    assert not w.a[0]["q_proj"][8].any() and not w.b[0]["q_proj"][8].any()
    assert not w.a[0]["down_proj"][[3, 5, 8]].any() and not w.a[1]["q_proj"][[3, 5, 8]].any()
    assert (w.a[0]["down_proj"][0] == 7).all()  # pages not written are untouched


def test_router_slots_are_a_second_resource():
    """MixLoRA adapters also take one of the pool's router slots: a full slot table evicts the least recently used
    unpinned slot holder (never a plain LoRA for it), and with every slot pinned nothing is changed."""
    evicted = []
    pool = AdapterPool(1 + 100, on_evict=evicted.append, num_slots=2)
    loads = []
    assert pool.acquire("lora", 8, lambda p: loads.append(("lora", None))) is not None
    assert pool.acquire("m1", 16, lambda p, s: loads.append(("m1", s)), slot=True) is not None
    assert pool.acquire("m2", 16, lambda p, s: loads.append(("m2", s)), slot=True) is not None
    assert {s for _, s in loads if s is not None} == {0, 1} and pool.num_free_slots == 0
    assert pool.acquire("m3", 16, lambda p, s: None, slot=True) is None  # m1, m2 pinned: no slot, nothing changed
    assert not evicted and pool.num_free_slots == 0
    for key in ("lora", "m1", "m2"):
        pool.release(key)
    assert pool.acquire("m3", 16, lambda p, s: loads.append(("m3", s)), slot=True) is not None
    assert evicted == ["m1"] and loads[-1] == ("m3", 0)  # the LRU slot holder went, the older plain LoRA stayed
    pool.release("m3")
    for key in list(pool.resident):
        pool.evict(key)
    assert pool.num_free_slots == 2 and pool.num_free_pages == 100
