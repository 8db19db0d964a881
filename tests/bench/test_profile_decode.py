"""scripts/bench/profile_decode.py --phases --adapter-rank end to end on the default model: base and adapter steps are
timed side by side, the stack's own clock is read on the adapter's steps and printed per phase (its adapter rows
included), each linear with its bytes and GB/s (numbers are the script's business; that they are there and sane is
this test's)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.engine.kernels import cpu_kernels

ROOT = Path(__file__).parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")]


def test_phases_are_printed_for_every_phase_and_linear(default_model_dir):
    done = subprocess.run([sys.executable, "profile_decode.py", "--model", str(default_model_dir), "--dtype", "float32",
                           "--batch", "1", "--steps", "4", "--cpu-linear", "stream", "--phases", "--top", "2",
                           "--adapter-rank", "4", "--rounds", "1"],
                          cwd=ROOT / "scripts" / "bench", capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"batch 1: base step [\d.]+ ms, on a rank-4 q/v adapter [\d.]+ ms .*adapter/base tok/s [\d.]+", out), out
    assert re.search(r"stack phases \(ms per step, \d+ lean calls on the adapter", out), out
    phases = dict(re.findall(r"^ {4}(\w+) +([\d.]+) ms", out, flags=re.MULTILINE))
    assert set(phases) == {"norms", "qkv", "lora", "elementwise", "attention", "o", "gate_up", "down"}, out
    assert all(float(phases[p]) > 0 for p in ("qkv", "o", "gate_up", "down", "attention")), out
    for linear in ("qkv", "o", "gate_up", "down"):  # f32 weights: q/k/v are 576 x 960 x 4 bytes a layer, 30 layers
        mb, gbs = re.search(rf"^ {{4}}{linear} +[\d.]+ ms +([\d.]+) MB +([\d.]+) GB/s", out, flags=re.MULTILINE).groups()
        assert float(mb) > 10 and float(gbs) > 0, out


def test_stream_ahead_times_both_distances_and_restores_the_builds(default_model_dir):
    """--stream-ahead 0 times each batch's steps at the build's prefetch distance and with none, alternating, and
    prints both and their ratio; an adapter alternation at the same time is refused."""
    args = [sys.executable, "profile_decode.py", "--model", str(default_model_dir), "--dtype", "bfloat16",
            "--batch", "1", "--steps", "3", "--cpu-linear", "stream", "--top", "1", "--rounds", "2",
            "--stream-ahead", "0"]
    done = subprocess.run(args, cwd=ROOT / "scripts" / "bench", capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    m = re.search(r"batch 1: step ([\d.]+) ms with the build's weight prefetch (\d+) bytes ahead, ([\d.]+) ms at 0 "
                  r"\(tok/s ratio build/other ([\d.]+), medians of 2 alternating rounds\)", done.stdout)
    assert m, done.stdout
    build_ms, ahead, other_ms, ratio = float(m[1]), int(m[2]), float(m[3]), float(m[4])
    assert ahead == cpu_kernels.stream_ahead() and build_ms > 0 and abs(ratio - other_ms / build_ms) < 2e-3
    refused = subprocess.run(args + ["--adapter-rank", "4"], cwd=ROOT / "scripts" / "bench", capture_output=True,
                             text=True, timeout=120, check=False)
    assert refused.returncode == 2 and "one at a time" in refused.stderr
