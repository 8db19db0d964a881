"""scripts/bench/bench_int8_layout.py end to end on a small 4-bit GPTQ export: both layouts run, alternate and are
compared in the table (the numbers are the script's business; that each layout really ran is this test's)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.engine.kernels import cpu_kernels

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")]


def test_both_layouts_run_and_are_compared(default_model_dir, tmp_path):
    from loraplex.engine.quant.gptq import export_gptq
    from tests.adapters.peft_factory import make_tiny_model
    folder = export_gptq(make_tiny_model(tmp_path / "tiny", default_model_dir), tmp_path / "q4", bits=4, group_size=64)
    done = subprocess.run([sys.executable, "bench_int8_layout.py", "--model", str(folder), "--batch", "1", "3",
                           "--steps", "4", "--rounds", "2"], cwd=ROOT / "scripts" / "bench", capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    rounds = re.findall(r"^round (\d), (\w+) \((\d+) linears\)", out, flags=re.MULTILINE)
    assert [(r, layout) for r, layout, _ in rounds] == [("1", "lanes"), ("1", "interleaved"), ("2", "lanes"),
                                                        ("2", "interleaved")], out
    assert all(int(n) > 0 for _, _, n in rounds), out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$", out, flags=re.MULTILINE)
    assert [r[0] for r in rows] == ["1", "3"] and all(float(v) > 0 for r in rows for v in r[1:]), out
    dense = subprocess.run([sys.executable, "bench_int8_layout.py", "--model", str(default_model_dir)],
                           cwd=ROOT / "scripts" / "bench", capture_output=True, text=True, timeout=600, check=False)
    assert dense.returncode != 0 and "not a GPTQ checkpoint" in dense.stderr and "Traceback" not in dense.stderr
