"""--stream-interval-ms: the engine loop holds a request's deltas back until its interval has passed and merges them;
the tokens, their order and the request's first and last outputs are those of the loop without it."""
from __future__ import annotations

import argparse
import itertools
import threading
import time

import pytest

from loraplex.engine.core.outputs import RequestOutput, TokenLogprob
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs, add_engine_args, engine_args_from
from loraplex.engine.engine_core import EngineLoop, OutputCoalescer
from tests.engine.test_cuda import tiny_model_dir  # noqa: F401 - fixture


def delta(rid: str, token: int, n: int, finished: bool = False, logprob: bool = False,
          prompt_logprobs: list | None = None) -> RequestOutput:
    return RequestOutput(rid, f"<{token}>", [token], finished, 3, n,
                         [TokenLogprob(token, f"<{token}>", -0.5 * token)] if logprob else None,
                         "length" if finished else None, None, prompt_logprobs)


def test_deltas_within_the_interval_are_held_and_merged_first_and_last_go_at_once():
    c = OutputCoalescer(0.010)
    first = c.add([delta("a", 1, 1, logprob=True, prompt_logprobs=["p"])], now=0.0)
    assert [o.token_ids for o in first] == [[1]] and len(c) == 0  # time to first token: never held
    assert c.add([delta("a", 2, 2, logprob=True)], now=0.004) == [] and len(c) == 1
    assert c.due(0.009) == []
    assert c.add([delta("a", 3, 3, logprob=True)], now=0.008) == []
    (out,) = c.due(0.011)
    assert (out.text, out.token_ids, out.num_output_tokens) == ("<2><3>", [2, 3], 3)
    assert [lp.token_id for lp in out.logprobs] == [2, 3] and out.prompt_logprobs is None and not out.finished
    assert len(c) == 0 and c.due(1.0) == []
    # a delta an interval after the last delivered one goes at once, the held one with it
    assert c.add([delta("a", 4, 4)], now=0.015) == []
    (out,) = c.add([delta("a", 5, 5)], now=0.022)
    assert out.token_ids == [4, 5] and out.logprobs is None
    # the finished delta goes at once, whatever is held merged in front of it
    assert c.add([delta("a", 6, 6)], now=0.023) == []
    (out,) = c.add([delta("a", 7, 7, finished=True)], now=0.024)
    assert out.token_ids == [6, 7] and out.finished and out.finish_reason == "length" and len(c) == 0


def test_requests_are_held_independently_and_release_all_empties_it():
    c = OutputCoalescer(0.010)
    assert len(c.add([delta("a", 1, 1), delta("b", 1, 1)], now=0.0)) == 2
    assert c.add([delta("a", 2, 2)], now=0.005) == []
    assert [o.request_id for o in c.add([delta("b", 2, 2, finished=True)], now=0.006)] == ["b"]
    assert [o.token_ids for o in c.release_all()] == [[2]] and len(c) == 0


def test_interval_zero_passes_every_delta_through():
    c = OutputCoalescer(0.0)
    outs = [delta("a", 1, 1), delta("a", 2, 2)]
    assert c.add(outs, now=0.0) is outs and len(c) == 0
    with pytest.raises(ValueError):
        OutputCoalescer(-1.0)


def test_the_flag_reaches_the_engine_args_and_is_bounded():
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    assert engine_args_from(ap.parse_args(["--stream-interval-ms", "25"])).stream_interval_ms == 25.0
    assert engine_args_from(ap.parse_args([])).stream_interval_ms == 20.0
    for bad in (-1, 5000):
        with pytest.raises(ValueError, match="stream-interval-ms"):
            EngineArgs(stream_interval_ms=bad)


def run(engine, interval_s: float, abort_after: int | None = None, b_tokens: int = 60):
    """Every emitted delta (time, output) of two greedy requests through an EngineLoop; with abort_after, the
    second request is aborted once that many of its tokens went out."""
    loop = EngineLoop(engine, reply=lambda *a: None, stream_interval_s=interval_s)
    got: list[tuple[float, RequestOutput]] = []
    done = threading.Event()

    def emit(outs, stats):
        now = time.monotonic()
        got.extend((now, o) for o in outs)
        if abort_after is not None and sum(len(o.token_ids) for _, o in got if o.request_id == "b") >= abort_after:
            loop.abort("b")
        if sum(o.finished for _, o in got) == 2:
            done.set()
    thread = threading.Thread(target=loop.run, args=(emit,), daemon=True)
    thread.start()
    loop.add("a", [5, 6, 7, 8], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), time.monotonic())
    loop.add("b", [9, 10, 11], SamplingParams(max_tokens=b_tokens, temperature=0.0, ignore_eos=True, logprobs=2),
             time.monotonic())
    assert done.wait(120)
    loop.stop()
    thread.join(10)
    assert len(loop.coalescer) == 0
    return got


def by_request(got, rid):
    return [(t, o) for t, o in got if o.request_id == rid]


def test_the_loop_streams_the_same_tokens_in_fewer_deltas(tiny_model_dir):  # noqa: F811
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), max_num_seqs=4))
    plain, held = run(engine, 0.0), run(engine, 0.05)
    for rid in ("a", "b"):
        p, h = by_request(plain, rid), by_request(held, rid)
        assert [t for _, o in h for t in o.token_ids] == [t for _, o in p for t in o.token_ids]
        assert "".join(o.text for _, o in h) == "".join(o.text for _, o in p)
        assert len(h[0][1].token_ids) == 1  # the first token alone
        assert h[-1][1].finished and [o.finished for _, o in h].count(True) == 1
        assert h[-1][1].num_output_tokens == len([t for _, o in h for t in o.token_ids])
        # a delivered delta before the last comes at least an interval after the one before it
        assert all(b[0] - a[0] >= 0.05 - 0.005 for a, b in itertools.pairwise(h[:-1]))
    b_plain = [lp.token_id for _, o in by_request(plain, "b") for lp in o.logprobs]
    b_held = [lp.token_id for _, o in by_request(held, "b") for lp in o.logprobs]
    assert b_held == b_plain == [t for _, o in by_request(plain, "b") for t in o.token_ids]
    assert len(by_request(held, "b")) < len(by_request(plain, "b"))


def test_an_abort_delivers_the_held_tokens_with_it(tiny_model_dir):  # noqa: F811
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), max_num_seqs=4))
    total = engine.stats().num_free_blocks
    got = run(engine, 0.05, abort_after=3, b_tokens=400)
    b = by_request(got, "b")
    assert b[-1][1].finished and b[-1][1].finish_reason == "abort"
    assert b[-1][1].num_output_tokens == sum(len(o.token_ids) for _, o in b) < 400
    assert engine.stats().num_free_blocks == total
