"""The benchmark's load generator: arrivals, adapter sampling, lengths, datasets; and its statistics."""
from __future__ import annotations

import json
import math
import random
import statistics

import numpy as np
import pytest

from loraplex.bench.stats import RequestResult, percentile, report, summarize
from loraplex.bench.workload import WorkloadSpec, adapter_weights, arrival_times, build_workload


def test_poisson_arrivals_have_exponential_gaps_of_mean_one_over_rate():
    times = arrival_times(20_000, 4.0, random.Random(1))
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd = mean
    # memoryless: P(gap > t) = exp(-rate t); check at the median and at the 90th percentile
    assert sum(g > math.log(2) / 4 for g in gaps) / len(gaps) == pytest.approx(0.5, abs=0.015)
    assert sum(g > math.log(10) / 4 for g in gaps) / len(gaps) == pytest.approx(0.1, abs=0.01)
    assert arrival_times(5, math.inf, random.Random(1)) == [0.0] * 5


def test_adapter_popularity_uniform_and_power_law():
    assert adapter_weights(4, "uniform", 1.0) == [0.25] * 4
    w = adapter_weights(3, "powerlaw", 1.0)  # 1 : 1/2 : 1/3
    assert w == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert adapter_weights(3, "powerlaw", 0.0) == pytest.approx([1 / 3] * 3)  # alpha 0 is uniform
    names = tuple(f"a{i}" for i in range(8))
    for dist, alpha in (("uniform", 1.0), ("powerlaw", 1.5)):
        spec = WorkloadSpec(model="base", adapters=names, num_prompts=16_000, adapter_dist=dist,
                            powerlaw_alpha=alpha, seed=3)
        counts = [sum(r.model == n for r in build_workload(spec)) for n in names]
        for got, p in zip(counts, adapter_weights(8, dist, alpha)):
            assert got / spec.num_prompts == pytest.approx(p, abs=0.012)


def test_base_fraction_and_no_adapters():
    spec = WorkloadSpec(model="base", adapters=("x", "y"), num_prompts=4000, base_fraction=0.25, seed=0)
    share = sum(r.model == "base" for r in build_workload(spec)) / 4000
    assert share == pytest.approx(0.25, abs=0.02)
    assert {r.model for r in build_workload(WorkloadSpec(model="base", num_prompts=10))} == {"base"}


def test_the_same_seed_gives_the_same_workload_and_lengths_stay_in_range():
    spec = WorkloadSpec(model="m", adapters=("a", "b"), num_prompts=200, request_rate=5.0, input_len=40,
                        output_len=20, range_ratio=0.5, seed=7)
    one, two = build_workload(spec), build_workload(spec)
    assert one == two
    assert all(10 <= r.max_tokens <= 30 for r in one)
    assert all(20 <= len(r.prompt.split()) <= 60 for r in one)
    assert len({r.max_tokens for r in one}) > 5  # drawn, not constant
    chat = build_workload(WorkloadSpec(model="m", num_prompts=3, endpoint="chat"))
    assert all(r.prompt is None and r.messages[0]["role"] == "user" for r in chat)


def test_a_different_seed_gives_a_different_workload():
    a = build_workload(WorkloadSpec(model="m", adapters=("a", "b"), num_prompts=50, request_rate=5.0, seed=1))
    b = build_workload(WorkloadSpec(model="m", adapters=("a", "b"), num_prompts=50, request_rate=5.0, seed=2))
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]


def test_dataset_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hello there", "max_tokens": 5}) + "\n\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    reqs = build_workload(WorkloadSpec(model="m", num_prompts=4, dataset=str(path), output_len=9))
    assert [(r.prompt, r.max_tokens) for r in reqs[::2]] == [("hello there", 5)] * 2
    assert [r.messages for r in reqs[1::2]] == [[{"role": "user", "content": "hi"}]] * 2
    assert [r.max_tokens for r in reqs[1::2]] == [9, 9]
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        build_workload(WorkloadSpec(model="m", dataset=str(path)))


@pytest.mark.parametrize("bad", [dict(num_prompts=0), dict(request_rate=0.0), dict(adapter_dist="zipf"),
                                 dict(base_fraction=1.5), dict(range_ratio=1.0), dict(endpoint="embeddings")])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError):
        WorkloadSpec(model="m", **bad)


def test_percentiles_match_numpy_on_known_inputs():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert math.isnan(percentile([], 50))
    rng = random.Random(0)
    values = [rng.expovariate(1.0) for _ in range(101)]
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_summary_counts_throughput_latencies_and_errors():
    results = [RequestResult(0, "a", 0.0, 10, 5, ttft_s=0.1, e2e_s=0.5),  # tpot (0.5-0.1)/4 = 0.1
               RequestResult(1, "b", 0.1, 10, 3, ttft_s=0.2, e2e_s=0.4),  # tpot 0.1
               RequestResult(2, "b", 0.2, error="HTTP 404: no such model"),
               RequestResult(3, "a", 0.3, 10, 1, ttft_s=0.3, e2e_s=0.3)]  # one token: no tpot
    s = summarize(results, duration_s=2.0)
    assert (s["requests"], s["completed"], s["errors"]) == (4, 3, 1)
    assert s["output_throughput"] == pytest.approx(4.5) and s["request_throughput"] == pytest.approx(1.5)
    assert s["ttft_ms"]["mean"] == pytest.approx(200) and s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["tpot_ms"]["mean"] == pytest.approx(100)
    assert s["e2e_ms"]["p99"] == pytest.approx(1000 * percentile([0.5, 0.4, 0.3], 99))
    full = report("serve", {"x": 1}, results, 2.0)
    assert set(full["per_model"]) == {"a", "b"} and full["per_model"]["b"]["errors"] == 1
    assert [r["index"] for r in full["requests"]] == [0, 1, 2, 3]
    json.dumps(full, allow_nan=True)
