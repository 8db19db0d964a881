"""The cluster's routing decision (serve/cluster_router.rank_replicas): a version goes where it is held, a hot
adapter spreads only when every holder's batch is full, a cold one goes where the LoRA pool has room, and base
requests prefer replicas with free KV blocks. (The Ray wiring is exercised for real in tests/e2e/test_cluster.py.)"""
from __future__ import annotations

from loraplex.serve.cluster_router import ReplicaView, rank_replicas

SPREAD = 4


def view(id, load=0, holds=False, num_adapters=0, pages=8, kv=100):
    return ReplicaView(id=id, load=load, holds=holds, num_adapters=num_adapters, lora_pages_free=pages,
                       kv_free_blocks=kv)


def first_choice(ranks, loads):
    """What Ray does with the ranks: the least loaded of the first rank that has any replica."""
    for rank in ranks:
        if rank:
            return min(rank, key=lambda i: loads[i])


def test_a_held_version_stays_on_its_holder_while_the_holder_has_room():
    replicas = [view("a", load=3, holds=True), view("b", load=0), view("c", load=0)]
    ranks = rank_replicas("poet@v1", replicas, SPREAD)
    assert ranks[0] == ["a"]  # an idle replica does not tempt it away: that would be a second load
    assert first_choice(ranks, {"a": 3, "b": 0, "c": 0}) == "a"


def test_a_hot_adapter_spreads_when_every_holder_is_full():
    replicas = [view("a", load=SPREAD, holds=True), view("b", load=1), view("c", load=SPREAD + 2)]
    ranks = rank_replicas("poet@v1", replicas, SPREAD)
    assert set(ranks[0]) == {"a", "b"}  # c has no free batch slot either: copying it there gains nothing
    assert first_choice(ranks, {"a": SPREAD, "b": 1, "c": SPREAD + 2}) == "b"
    # once b holds it too, both are holders and share the load
    replicas = [view("a", load=SPREAD, holds=True), view("b", load=2, holds=True), view("c", load=0)]
    assert rank_replicas("poet@v1", replicas, SPREAD)[0] == ["b"]


def test_a_version_nobody_holds_goes_where_the_pool_has_room():
    replicas = [view("a", pages=0, num_adapters=1), view("b", pages=8, num_adapters=3), view("c", pages=8,
                                                                                          num_adapters=1)]
    ranks = rank_replicas("iris@v2", replicas, SPREAD)
    assert ranks == [["c"], ["b"], ["a"]]  # one replica (fewer adapters resident), then room in the pool, a full one last


def test_unknown_loads_and_stats_are_not_penalised():
    replicas = [ReplicaView(id="a", load=None, holds=True, num_adapters=0, lora_pages_free=None,
                            kv_free_blocks=None), view("b")]
    assert rank_replicas("poet@v1", replicas, SPREAD)[0] == ["a"]
    assert rank_replicas(None, replicas, SPREAD)[0] == ["a", "b"]


def test_base_requests_prefer_free_kv_blocks():
    replicas = [view("a", kv=0), view("b", kv=10), view("c", kv=3)]
    assert rank_replicas(None, replicas, SPREAD) == [["b", "c"], ["a"]]


def test_equal_replicas_take_different_cold_adapters():
    replicas = [view("a"), view("b"), view("c")]
    firsts = {rank_replicas(f"bloom{i}@v1", replicas, SPREAD)[0][0] for i in range(12)}
    assert firsts == {"a", "b", "c"}
