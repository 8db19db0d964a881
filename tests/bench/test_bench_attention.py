"""scripts/bench/bench_attention.py --decode end to end: a row per context length, with the keys and values a step
reads and the bound they give at the bandwidth it measured (the timings are the script's business)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.engine.kernels import cpu_kernels

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")]


def test_decode_attention_rows_count_the_bytes_a_step_reads():
    done = subprocess.run([sys.executable, "bench_attention.py", "--decode", "--rows", "2", "--lengths", "40,200"],
                          cwd=ROOT / "scripts" / "bench", capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    bandwidth = float(re.search(r"read bandwidth ([\d.]+) GB/s", out).group(1))
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \([\d.]+\) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$",
                      out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [40, 200], out
    for n, mb, bound_ms, cold, warm, sdpa, ratio in ((int(r[0]), *map(float, r[1:])) for r in rows):
        # keys and values, bfloat16, 3 kv heads x 64, 30 layers, 2 rows
        assert mb == pytest.approx(2 * 30 * 2 * n * 3 * 64 * 2 / 1e6, abs=0.06), out
        assert bound_ms == pytest.approx(mb / bandwidth, rel=0.02, abs=0.002), out
        assert cold > 0 and warm > 0 and sdpa > 0 and ratio == pytest.approx(sdpa / cold, rel=0.05, abs=0.01), out
