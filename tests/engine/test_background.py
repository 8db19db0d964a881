"""Background work (the trainer) in the engine loop: the share policy, control-call routing, and inference
continuing while background work runs."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from loraplex.engine.background import SharePolicy
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.engine_core import EngineLoop
from tests.engine.test_cuda import tiny_model_dir  # noqa: F401 - fixture


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_share_policy():
    clock = FakeClock()
    policy = SharePolicy(0.25, window_s=10.0, clock=clock)
    assert policy.may_run(has_requests=False) and policy.may_run(has_requests=True)  # nothing measured yet
    policy.record(inference_s=0.3)
    assert policy.may_run(has_requests=True)  # 0 of 0.3 s
    policy.record(background_s=0.1)
    assert not policy.may_run(has_requests=True)  # 0.1 / 0.4 = 25%: at the cap
    assert policy.may_run(has_requests=False)  # idle: all of it
    policy.record(inference_s=0.1)
    assert policy.may_run(has_requests=True)  # 0.1 / 0.5
    clock.now += 1000.0  # the window forgets
    assert policy.background_fraction == pytest.approx(0.2) and policy.may_run(True)
    assert not SharePolicy(0.0).may_run(has_requests=True) and SharePolicy(0.0).may_run(has_requests=False)
    with pytest.raises(ValueError, match="train-share"):
        SharePolicy(1.5)


def test_step_log_shows_training_slices(caplog):
    import logging

    from loraplex.engine.core.outputs import EngineStats
    from loraplex.engine.engine_core import StepLog
    log = StepLog(interval_s=0.0)
    log.record_background(0.05, policy_fraction=0.24)
    log.record_background(0.12, policy_fraction=0.25)
    with caplog.at_level(logging.INFO, logger="loraplex.engine.engine_core"):
        log.record(0.04, 16, lambda: EngineStats(num_running=16, num_waiting=0, num_free_blocks=90, num_total_blocks=100))
    line = caplog.records[-1].getMessage()
    assert "running 16" in line and "2 slices, max 120 ms, policy 25%" in line, line
    assert log.num_background == 0  # a fresh window after each line


class FakeWork:
    def __init__(self, steps: int, step_s: float, under_load=lambda: False) -> None:
        self.left, self.step_s, self.calls, self.ran = steps, step_s, [], 0
        self.under_load, self.loaded_s = under_load, 0.0  # time spent while requests were in flight

    def has_work(self) -> bool:
        return self.left > 0

    def run_step(self) -> None:
        if self.under_load():
            self.loaded_s += self.step_s
        time.sleep(self.step_s)
        self.left -= 1
        self.ran += 1

    def call(self, method, args):
        self.calls.append((method, args))
        return "ok"

    def stats(self) -> dict:
        return {}

    def tick(self) -> None:
        self.ticks = getattr(self, "ticks", 0) + 1


def run_loop(engine, seconds: float):
    loop = EngineLoop(engine, reply=lambda *a: None, train_share=0.2)
    outputs = []
    thread = threading.Thread(target=loop.run, args=(lambda outs, stats: outputs.extend(outs),), daemon=True)
    thread.start()
    return loop, thread, outputs


def test_loop_runs_background_work_when_idle_and_within_its_share_under_load(tiny_model_dir):  # noqa: F811
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), max_num_seqs=4))
    work = FakeWork(steps=10**6, step_s=0.01, under_load=engine.has_unfinished_requests)
    engine.background = work
    inference_s = []
    step = engine.step

    def timed_step():
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            inference_s.append(time.perf_counter() - t0)
    engine.step = timed_step
    assert engine.call("train_submit", ("ftjob-1",)) == "ok" and work.calls == [("train_submit", ("ftjob-1",))]
    loop, thread, outputs = run_loop(engine, 0)
    time.sleep(0.3)
    idle_steps = work.ran
    assert idle_steps >= 10  # idle: background work runs back to back
    params = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    for i in range(4):
        loop.add(f"r{i}", [5, 6, 7, 8], params, time.monotonic())
    deadline = time.monotonic() + 60
    while sum(1 for o in outputs if o.finished) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    loop.stop()
    thread.join(10)
    assert sum(1 for o in outputs if o.finished) == 4  # requests complete while background work has work
    assert sum(len(o.token_ids) for o in outputs) == 480
    total = work.loaded_s + sum(inference_s)
    share = work.loaded_s / total
    # training went on under load, within its share: the policy decides before each slice, so it may end one slice
    # over (decode steps of the tiny model take ~1 ms, a slice 10 ms)
    assert work.loaded_s > 0 and share <= 0.2 + 0.05 + work.step_s / total, (share, total)


def test_train_calls_without_a_trainer_fail_clearly(tiny_model_dir):  # noqa: F811
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), max_num_seqs=2))
    with pytest.raises(ValueError, match="no trainer"):
        engine.call("train_submit", ("x",))


def test_the_loop_sends_stats_with_requests_ending_and_between_at_most_every_interval(tiny_model_dir):  # noqa: F811
    """Stats go out with the outputs that end a request (so free-block counts are current once it is done), after
    adds, and otherwise at most every STATS_INTERVAL_S while tokens stream (None between: the receiver keeps the
    last)."""
    from loraplex.engine import engine_core
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(tiny_model_dir), max_num_seqs=4))
    total = engine.stats().num_free_blocks
    loop = EngineLoop(engine, reply=lambda *a: None)
    emits = []
    thread = threading.Thread(target=loop.run, args=(lambda outs, stats: emits.append((time.monotonic(),
                                                                                       list(outs), stats)),),
                              daemon=True)
    thread.start()
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    loop.add("a", [5, 6, 7, 8], params, time.monotonic())
    deadline = time.monotonic() + 60
    while not any(o.finished for _, outs, _ in emits for o in outs) and time.monotonic() < deadline:
        time.sleep(0.02)
    loop.stop()
    thread.join(10)
    with_stats = [(t, outs, s) for t, outs, s in emits if s is not None]
    assert emits[0][2] is not None  # right after the add
    assert any(s is None for _, _, s in emits)  # a 200-token request streams many steps in one interval
    assert all(b[0] - a[0] >= engine_core.STATS_INTERVAL_S - 1e-3
               for a, b in itertools.pairwise(with_stats) if not any(o.finished for o in b[1]))
    _, last_outs, last = with_stats[-1]
    assert any(o.finished for o in last_outs) and last.num_running == 0 and last.num_free_blocks == total
