"""scripts/bench/bench_linear_ceiling.py end to end on the default model (float32, streamed): every linear phase of a
step is timed from memory and in cache, with the bytes a step reads in it (numbers are the script's business; that
each phase is there with the right bytes and the summary adds up is this test's)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.engine.kernels import cpu_kernels

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")]


def test_every_phase_is_timed_from_memory_and_in_cache(default_model_dir):
    done = subprocess.run([sys.executable, "bench_linear_ceiling.py", "--model", str(default_model_dir), "--passes", "1"],
                          cwd=ROOT / "scripts" / "bench", capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rows = {m[0]: [float(v) for v in m[1:]] for m in re.findall(
        r"^\| (\w+) \| 30 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \([\d.]+\) \| ([\d.]+) \([\d.]+\) \|$", out, re.MULTILINE)}
    assert set(rows) == {"qkv", "o", "gate_up", "down"}, out
    bandwidth = float(re.search(r"measured read bandwidth ([\d.]+) GB/s", out).group(1))
    # float32 weights, 30 layers of 576 wide: q/k/v 960 rows, o 576, gate/up 2 x 1536, down 1536 columns
    for phase, rows_out, cols in (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)):
        mb, bound_ms, memory_ms, cache_ms = rows[phase]
        assert mb == pytest.approx(30 * rows_out * cols * 4 / 1e6, abs=0.06), (phase, out)
        assert bound_ms == pytest.approx(mb / bandwidth, rel=0.01, abs=0.002), (phase, out)  # bytes / bandwidth
        assert memory_ms > 0 and cache_ms > 0, (phase, out)
    total_mb = float(re.search(r"all linears: ([\d.]+) MB", out).group(1))
    assert total_mb >= sum(r[0] for r in rows.values()) - 0.1, out  # the head too, where it streams
