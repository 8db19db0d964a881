"""Per-request results -> throughput and latency statistics (overall and per model)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class RequestResult:
    index: int
    model: str
    arrival_s: float  # scheduled arrival, seconds after the start
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None  # arrival -> first output token
    e2e_s: float | None = None  # arrival -> last token
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None with fewer than two tokens)."""
        if self.error or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return asdict(self) | {"tpot_s": self.tpot_s}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: list[float]) -> dict:
    ms = [1000 * v for v in values_s]
    return {"mean": sum(ms) / len(ms) if ms else math.nan, "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99)}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else math.nan,
        "output_throughput": out_tokens / duration_s if duration_s > 0 else math.nan,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
        "ttft_ms": distribution_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([t for t in (r.tpot_s for r in ok) if t is not None]),
        "e2e_ms": distribution_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
    }


def summarize_by_model(results: list[RequestResult], duration_s: float) -> dict[str, dict]:
    by: dict[str, list[RequestResult]] = {}
    for r in results:
        by.setdefault(r.model, []).append(r)
    return {model: summarize(rs, duration_s) for model, rs in sorted(by.items())}


def report(kind: str, config: dict, results: list[RequestResult], duration_s: float) -> dict:
    """The result file's content."""
    return {"kind": kind, "config": config, "overall": summarize(results, duration_s),
            "per_model": summarize_by_model(results, duration_s),
            "requests": [r.to_json() for r in sorted(results, key=lambda r: r.index)]}


def format_summary(result: dict) -> str:
    o = result["overall"]
    lines = [f"{o['completed']}/{o['requests']} requests in {o['duration_s']:.1f} s, {o['errors']} errors",
             f"request throughput {o['request_throughput']:.2f} req/s, output {o['output_throughput']:.1f} tok/s "
             f"({o['total_output_tokens']} tokens, {o['total_prompt_tokens']} prompt tokens)"]
    for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
        d = o[name]
        lines.append(f"{name[:-3].upper():>5} ms: mean {d['mean']:.1f}  p50 {d['p50']:.1f}  p90 {d['p90']:.1f}  "
                     f"p99 {d['p99']:.1f}")
    errors = [r["error"] for r in result["requests"] if r["error"]]
    if errors:
        lines.append(f"first error: {errors[0]}")
    if len(result["per_model"]) > 8:
        lines.append(f"{len(result['per_model'])} models: per-model figures are in the result file")
    elif len(result["per_model"]) > 1:
        lines.append("per model: " + ", ".join(f"{m} {s['completed']} req {s['output_throughput']:.1f} tok/s "
                                               f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms"
                                               for m, s in result["per_model"].items()))
    return "\n".join(lines)
