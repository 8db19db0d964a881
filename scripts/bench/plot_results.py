"""Plots for docs/benchmarks.md from `loraplex bench` result files (and the peft baselines' files).

    python scripts/bench/plot_results.py docs/results      # writes adapters.png and rate.png there

adapters.png: output tokens/s against the number of distinct adapters in the workload, one line per
label (loraplex serve, loraplex offline, peft batched, ...); rate.png: TTFT and end-to-end latency (p50 and
p99) against the request rate of the files named *-rate-*.json. Also prints a Markdown table of every file.
Needs matplotlib (`pip install -e '.[plots]'`).
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def load(folder: Path) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]


def label_of(result: dict) -> str:
    return result["config"].get("label") or result["kind"]


def table(results: list[tuple[str, dict]]) -> str:
    rows = ["| file | run | adapters | rate (req/s) | output tok/s | TTFT p50 / p99 ms | TPOT p50 ms | E2E p50 / p99 ms | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results:
        o, c = r["overall"], r["config"]
        rows.append(f"| {name} | {label_of(r)} | {c['num_adapters']} | {c['request_rate'] or 'all at once'} | "
                    f"{o['output_throughput']:.1f} | {o['ttft_ms']['p50']:.0f} / {o['ttft_ms']['p99']:.0f} | "
                    f"{o['tpot_ms']['p50']:.1f} | {o['e2e_ms']['p50']:.0f} / {o['e2e_ms']['p99']:.0f} | {o['errors']} |")
    return "\n".join(rows)


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
    results = load(folder)
    print(table(results))

    by_label = defaultdict(list)
    for name, r in results:
        if "-rate-" not in name:
            by_label[label_of(r)].append((r["config"]["num_adapters"], r["overall"]["output_throughput"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in sorted(by_label.items()):
        points.sort()
        ax.plot([max(n, 1) if len(points) > 1 else n for n, _ in points], [t for _, t in points], marker="o",
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the workload (1 = base model only)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Throughput vs number of adapters", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "adapters.png", dpi=110)

    rate = sorted(((r["config"]["request_rate"], r) for name, r in results if "-rate-" in name),
                  key=lambda x: x[0])
    if rate:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        xs = [x for x, _ in rate]
        for metric, style in (("ttft_ms", "--"), ("e2e_ms", "-")):
            for q in ("p50", "p99"):
                ax.plot(xs, [r["overall"][metric][q] for _, r in rate], style, marker="o",
                        label=f"{metric[:-3].upper()} {q}")
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Latency vs request rate ({label_of(rate[0][1])}, "
                     f"{rate[0][1]['config']['num_adapters']} adapters)", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / "rate.png", dpi=110)
    print(f"plots written to {folder}")


if __name__ == "__main__":
    main()
