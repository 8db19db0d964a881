"""Continuous-batching scheduler: each step maps requests to new tokens within a token budget,
mixing decodes and prefill chunks, with prefix-cache admission and recompute preemption
(after vLLM v1's Scheduler and nano-vllm). Pure Python over plain data.

Step contract: the engine calls `schedule()`, runs the model on the returned `SchedulerOutput`,
then calls `update_from_output()` exactly once before the next `schedule()`.
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from loraplex.engine.core.config import SchedulerConfig
from loraplex.engine.core.errors import PromptTooLongError
from loraplex.engine.core.kv_cache import KVCacheManager, cdiv
from loraplex.engine.core.request import Request, RequestStatus
from loraplex.engine.core.spec_decode import (
    Backoff,
    SpeculativeConfig,
    accepted_prefix,
    can_multi_step,
    can_speculate,
    ngram_draft,
)

AdmissionHook = Callable[[Request], bool]


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start_pos: int  # request.num_computed_tokens before this step: position of the first new token
    block_ids: list[int]  # the request's full block table after allocation
    sample: bool  # after this step every known token is computed: sample the next one
    # prompt-lookup draft (engine/core/spec_decode.py): fed after the request's last token, each row scored
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    # Decodes (num_new_tokens == 1) first, then speculative decodes, then prefill chunks; the runner relies on it.
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests finished or aborted since the previous step: the runner drops their per-request state.
    finished_request_ids: list[str] = field(default_factory=list)
    # > 1: every entry is a plain-greedy decode whose blocks hold this many more tokens; the runner may decode up to
    # this many tokens for each, feeding each step's tokens to the next (SchedulerConfig.num_scheduler_steps)
    num_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class RequestUpdate(NamedTuple):
    """One request's change in a step: the tokens it gained, and whether it is now finished (its
    status, stop_reason and full token lists are on `request`). Unpacks as (request, new_token_ids)."""
    request: Request
    new_token_ids: list[int]

    @property
    def finished(self) -> bool:
        return self.request.is_finished


class Scheduler:
    """Waiting requests are admitted first come, first served. A request that lacks KV blocks, a
    sequence slot or token budget blocks the ones behind it (so it cannot starve). A request that
    is refused for adapter reasons (the `max_loras` cap, or `admission_hook` returning False) is
    skipped, and from then on in that step no later request with a non-zero adapter is admitted,
    so the adapters in use drain and the skipped one gets in (no adapter starves behind a hot one);
    base-model requests pass.

    `admission_hook(request) -> bool` is called once each time a request is about to move from
    waiting to running (again after a preemption), after every other check passed, so a True may
    pin resources: requests leave running through `SchedulerOutput.preempted_request_ids` and
    `finished_request_ids`.
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 admission_hook: AdmissionHook | None = None, speculative: SpeculativeConfig | None = None) -> None:
        self.scheduler_config = scheduler_config
        self.speculative = speculative
        self.num_draft_tokens = 0  # drafted / accepted by the model, since start (speculative decoding)
        self.num_accepted_tokens = 0
        self._backoff: dict[str, Backoff] = {}  # per speculating request
        self.kv_cache_manager = kv_cache_manager
        self.admission_hook = admission_hook
        # multi_step_cap(rows): at most this many steps in a multi-step decode of that many rows (None: up to
        # num_scheduler_steps); the engine sets it from the time its decode steps take, to fit its stream interval
        self.multi_step_cap: Callable[[int], int] | None = None
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival_time: the last one is the newest
        self.finished_request_ids: list[str] = []

    # ---- bookkeeping ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def add_request(self, request: Request) -> None:
        cfg = self.scheduler_config
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        max_tokens = request.sampling_params.max_tokens
        if request.num_prompt_tokens > cfg.max_model_len:
            raise PromptTooLongError(request.num_prompt_tokens, max_tokens, cfg.max_model_len)
        # The most tokens whose K/V are ever cached: the last sampled token is never computed.
        max_kv_tokens = min(request.num_prompt_tokens + max_tokens - 1,
                            max(cfg.max_model_len - 1, request.num_prompt_tokens))
        kv = self.kv_cache_manager
        if cdiv(max_kv_tokens, kv.block_size) > kv.num_total_blocks:
            raise ValueError(f"request needs up to {max_kv_tokens} tokens of KV cache but the cache holds "
                             f"only {kv.num_total_blocks * kv.block_size}; reduce the prompt or max_tokens")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], finished_status: RequestStatus) -> None:
        """Finish waiting or running requests from outside the step (aborts, stop strings) and free
        their blocks. Unknown or already finished ids are ignored."""
        if not finished_status.is_finished:
            raise ValueError(f"{finished_status!r} is not a finished status")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = finished_status
            self._free_request(request)

    def _free_request(self, request: Request) -> None:
        self._backoff.pop(request.request_id, None)
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.finished_request_ids.append(request.request_id)

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the K/V, keep the tokens (prompt and outputs so far)."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- the step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        multi = self._schedule_multi_step()
        if multi is not None:
            return multi
        cfg = self.scheduler_config
        kv = self.kv_cache_manager
        token_budget = cfg.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # Running requests, oldest first: decodes and the rest of chunked prefills.
        req_index = 0
        while req_index < len(self.running) and token_budget > 0:
            request = self.running[req_index]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, token_budget)
            if num_new_tokens <= 0:  # nothing to compute (update_from_output was skipped)
                req_index += 1
                continue
            draft = self._draft(request, token_budget) if num_new_tokens == 1 else []
            if draft and (block_ids := kv.allocate_slots(request, 1 + len(draft))) is not None:
                scheduled.append(ScheduledRequest(request, 1 + len(draft), request.num_computed_tokens, block_ids,
                                                  sample=True, draft_token_ids=draft))
                token_budget -= 1 + len(draft)
                req_index += 1
                continue  # (no room for the draft: decode plainly, never preempt for a guess)
            while (block_ids := kv.allocate_slots(request, num_new_tokens)) is None:
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if block_ids is None:
                break
            scheduled.append(self._scheduled(request, num_new_tokens, block_ids))
            token_budget -= num_new_tokens
            req_index += 1

        # Waiting requests, first come first served; none after a preemption (blocks are short).
        if not preempted:
            token_budget = self._admit_waiting(token_budget, scheduled)

        # stable: plain decodes first, then speculative ones, then prefill chunks
        scheduled.sort(key=lambda s: 0 if s.num_new_tokens == 1 else 1 if s.draft_token_ids else 2)
        output = SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=cfg.max_num_batched_tokens - token_budget,
            preempted_request_ids=[r.request_id for r in preempted],
            finished_request_ids=self.finished_request_ids,
        )
        self.finished_request_ids = []
        return output

    def _schedule_multi_step(self) -> SchedulerOutput | None:
        """A multi-step decode of every running request, or None (schedule a plain step). Taken when
        num_scheduler_steps > 1, prompt-lookup drafting is off (a group's tokens would skip the drafts it could have
        made at each of them), nothing waits (an arrival would wait out the extra steps), and every running request
        is decoding with greedy argmax as its whole sampling rule (`can_multi_step`). The steps are capped by each
        request's max_tokens and max_model_len (no token is computed past a length limit), by `multi_step_cap`, and
        by the free blocks (never preempting for the extra tokens)."""
        cfg = self.scheduler_config
        if cfg.num_scheduler_steps <= 1 or self.speculative is not None or self.waiting or not self.running \
                or len(self.running) > cfg.max_num_batched_tokens:
            return None
        steps = cfg.num_scheduler_steps if self.multi_step_cap is None else min(
            cfg.num_scheduler_steps, self.multi_step_cap(len(self.running)))
        if steps <= 1:
            return None
        for request in self.running:
            if request.num_tokens - request.num_computed_tokens != 1 or not can_multi_step(request):
                return None
            steps = min(steps, request.sampling_params.max_tokens - request.num_output_tokens,
                        cfg.max_model_len - request.num_tokens)
        if steps <= 1:
            return None
        kv = self.kv_cache_manager
        while steps > 1 and sum(kv.num_blocks_needed(r, steps) for r in self.running) > kv.num_free_blocks:
            steps -= 1  # as many as the free blocks hold
        if steps <= 1:
            return None
        scheduled = []
        for request in self.running:
            block_ids = kv.allocate_slots(request, steps)
            assert block_ids is not None
            scheduled.append(ScheduledRequest(request, 1, request.num_computed_tokens, block_ids, sample=True))
        output = SchedulerOutput(scheduled=scheduled, num_batched_tokens=len(scheduled),
                                 finished_request_ids=self.finished_request_ids, num_steps=steps)
        self.finished_request_ids = []
        return output

    def _admit_waiting(self, token_budget: int, scheduled: list[ScheduledRequest]) -> int:
        cfg = self.scheduler_config
        kv = self.kv_cache_manager
        active_loras = {r.adapter_id for r in self.running if r.adapter_id}
        skipped: list[Request] = []
        adapter_blocked = False
        while self.waiting and token_budget > 0 and len(self.running) < cfg.max_num_seqs:
            request = self.waiting.popleft()
            if request.is_waiting_off_loop:  # skipped, blocking nobody: its turn comes once it is ready
                skipped.append(request)
                continue
            adapter_id = request.adapter_id
            if adapter_id and (adapter_blocked or (adapter_id not in active_loras
                                                   and len(active_loras) >= cfg.max_loras)):
                skipped.append(request)
                adapter_blocked = True
                continue
            computed_blocks, num_computed = kv.get_computed_blocks(request)
            num_new_tokens = request.num_tokens - num_computed
            if num_new_tokens > token_budget:
                if not cfg.enable_chunked_prefill:
                    self.waiting.appendleft(request)
                    break
                num_new_tokens = token_budget
            if not kv.can_allocate(request, num_new_tokens, computed_blocks):
                self.waiting.appendleft(request)
                break
            if self.admission_hook is not None and not self.admission_hook(request):
                skipped.append(request)
                adapter_blocked = adapter_blocked or adapter_id != 0
                continue
            block_ids = kv.allocate_slots(request, num_new_tokens, computed_blocks)
            assert block_ids is not None
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.arrival_time)
            if adapter_id:
                active_loras.add(adapter_id)
            scheduled.append(self._scheduled(request, num_new_tokens, block_ids))
            token_budget -= num_new_tokens
        self.waiting.extendleft(reversed(skipped))
        return token_budget

    def _draft(self, request: Request, token_budget: int) -> list[int]:
        """A prompt-lookup draft for a decoding request that can take one, within the budget and its length limits."""
        spec = self.speculative
        if spec is None or not can_speculate(request.sampling_params):
            return []
        if spec.disable_by_batch_size is not None and len(self.running) >= spec.disable_by_batch_size:
            return []
        if not self._backoff.setdefault(request.request_id, Backoff()).ready():
            return []
        # accepted drafts + the model's token must fit max_tokens and max_model_len
        room = min(spec.num_speculative_tokens, token_budget - 1,
                   request.sampling_params.max_tokens - request.num_output_tokens - 1,
                   self.scheduler_config.max_model_len - request.num_tokens - 1)
        if room <= 0:
            return []
        return ngram_draft(request.all_token_ids, room, spec.prompt_lookup_max, spec.prompt_lookup_min)

    @staticmethod
    def _scheduled(request: Request, num_new_tokens: int, block_ids: list[int]) -> ScheduledRequest:
        start_pos = request.num_computed_tokens
        return ScheduledRequest(request, num_new_tokens, start_pos, block_ids,
                                sample=start_pos + num_new_tokens == request.num_tokens)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           sampled_token_ids: dict[str, int | list[int]]) -> list[RequestUpdate]:
        """Apply a step's result. `sampled_token_ids` maps request_id -> the token sampled for every
        scheduled request with sample=True (for one with a draft: the greedy token of each of its rows).
        Returns one RequestUpdate per request that gained tokens or finished in this step; requests
        finished meanwhile (aborts) are skipped."""
        updates: list[RequestUpdate] = []
        multi_step = scheduler_output.num_steps > 1
        for sched in scheduler_output.scheduled:
            request = sched.request
            if request.status != RequestStatus.RUNNING:
                continue
            new_token_ids: list[int] = []
            if sched.draft_token_ids:
                greedy = sampled_token_ids[request.request_id]
                accepted = accepted_prefix(sched.draft_token_ids, greedy)
                self.num_draft_tokens += len(sched.draft_token_ids)
                self.num_accepted_tokens += accepted
                self._backoff.setdefault(request.request_id, Backoff()).record(accepted)
                request.num_computed_tokens += 1 + accepted  # the fed token and the confirmed drafts
                self._take_tokens(request, greedy[:accepted + 1], new_token_ids)
            elif multi_step:  # the runner's tokens, each computed after the ones before it: all of them stand
                got = sampled_token_ids[request.request_id]
                got = [got] if isinstance(got, int) else got
                request.num_computed_tokens += len(got)  # fed: the last token, then every new one but the last
                self._take_tokens(request, got, new_token_ids)
            else:
                request.num_computed_tokens += sched.num_new_tokens
                if sched.sample:
                    self._take_tokens(request, [sampled_token_ids[request.request_id]], new_token_ids)
            if new_token_ids and request.first_token_time is None:
                request.first_token_time = time.monotonic()
            self.kv_cache_manager.cache_full_blocks(request)
            if request.is_finished:
                self.running.remove(request)
                self._free_request(request)
            if new_token_ids or request.is_finished:
                updates.append(RequestUpdate(request, new_token_ids))
        return updates

    def _take_tokens(self, request: Request, token_ids: list[int], new_token_ids: list[int]) -> None:
        """Append `token_ids` to the request's output (and to `new_token_ids`) in order, until one finishes it."""
        for token_id in token_ids:
            request.output_token_ids.append(token_id)
            new_token_ids.append(token_id)
            self._check_stop(request, token_id)
            if request.is_finished:
                break

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in request.eos_token_ids and not params.ignore_eos:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            if token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return
        if (request.num_output_tokens >= params.max_tokens
                or request.num_tokens >= self.scheduler_config.max_model_len):
            request.status = RequestStatus.FINISHED_LENGTH
