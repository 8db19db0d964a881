"""StructuredOutputManager: the engine's one owner of grammars and matchers (vLLM v1's structured_output manager,
with xgrammar as the backend).

Compilation runs on a worker thread, cached by (kind, value): a request waits (Request.waiting_for_grammar, which
the scheduler skips) until its grammar is ready, the step loop never compiles. Each running constrained request has
a GrammarMatcher; `fill_bitmask` builds the step's [rows, ceil(vocab / 32)] int32 mask (all ones for free rows), the
sampler applies it, and `accept` advances the matcher by the sampled token.

Measured against llguidance 1.9.1 on the default model's 49152-token vocabulary (a nested object schema, 36-token
answer): mask fill 0.007 ms/token (llguidance 0.066), compile 5 ms (2.4), tokenizer set-up 119 ms (305).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import re
from collections import OrderedDict
from typing import Any

import torch

from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import StructuredOutput

logger = logging.getLogger(__name__)


JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object
MAX_CACHED_GRAMMARS = 256  # distinct constraints kept compiled (least recently used go first)
MAX_COMPILER_CACHE_BYTES = 256 << 20  # xgrammar's own cache of compiled grammars


def require_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise ValueError("structured output needs xgrammar: pip install 'loraplex[structured]'") from None
    return xgrammar


def choice_regex(choices: list[str]) -> str:
    """One of the given strings, exactly."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def validate(spec: StructuredOutput) -> None:
    """Parse the grammar without a tokenizer (cheap: the HTTP process does it before a request is queued).
    Raises ValueError naming the problem."""
    xgr = require_xgrammar()
    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(spec.value, any_whitespace=False, strict_mode=spec.strict)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.value)
        elif spec.kind == "choice":
            choices = json.loads(spec.value)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise ValueError("choice needs a non-empty list of non-empty strings")
            xgr.Grammar.from_regex(choice_regex(choices))
        elif spec.kind == "grammar":
            xgr.Grammar.from_ebnf(spec.value)
    except RuntimeError as exc:  # xgrammar's parse errors: "[time] file.cc:line: message"
        raise ValueError(str(exc).split(": ", 1)[-1].strip()) from None


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        xgr = require_xgrammar()
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        # every client can send a new schema: both caches are bounded
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=MAX_COMPILER_CACHE_BYTES)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loraplex-grammar")
        self._compiled: OrderedDict[StructuredOutput, concurrent.futures.Future] = OrderedDict()
        self._pending: dict[str, tuple[Request, concurrent.futures.Future]] = {}
        self._matchers: dict[str, Any] = {}  # request_id -> GrammarMatcher
        self.num_words = (vocab_size + 31) // 32

    # ---- compilation ----------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        spec = request.sampling_params.structured_output
        future = self._compiled.get(spec)
        if future is None:
            future = self._compiled[spec] = self._pool.submit(self._compile, spec)
            if len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)  # a request waiting on it keeps its future in _pending
        else:
            self._compiled.move_to_end(spec)
        if future.done() and future.exception() is None:
            self._matchers[request.request_id] = self._xgr.GrammarMatcher(future.result())
            return
        request.waiting_for_grammar = True
        self._pending[request.request_id] = (request, future)

    def _compile(self, spec: StructuredOutput):
        c = self._compiler
        # compact JSON (no free whitespace): a small model cannot wander into endless newlines and indentation
        if spec.kind == "json_schema":
            return c.compile_json_schema(spec.value, any_whitespace=False, strict_mode=spec.strict)
        if spec.kind == "json_object":
            return c.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return c.compile_regex(spec.value)
        if spec.kind == "choice":
            return c.compile_regex(choice_regex(json.loads(spec.value)))
        return c.compile_grammar(spec.value)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def poll(self, wait_s: float = 0.0) -> list[tuple[Request, str]]:
        """Give requests whose grammar is compiled their matcher. Returns (request, error) for failed compiles.
        `wait_s`: block up to that long for the first one to finish (the loop has nothing else to do)."""
        if wait_s > 0 and self._pending:
            concurrent.futures.wait([f for _, f in self._pending.values()], timeout=wait_s,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        failed = []
        for request_id, (request, future) in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[request_id]
            request.waiting_for_grammar = False
            if future.exception() is not None:
                self._compiled.pop(request.sampling_params.structured_output, None)
                failed.append((request, f"grammar compilation failed: {future.exception()}"))
            else:
                self._matchers[request_id] = self._xgr.GrammarMatcher(future.result())
        return failed

    # ---- the step -------------------------------------------------------------------------
    def constrains(self, requests: list[Request]) -> bool:
        """Whether any of `requests` follows a grammar (fill_bitmask would return a bitmask)."""
        return any(r.request_id in self._matchers for r in requests)

    def fill_bitmask(self, requests: list[Request]) -> torch.Tensor | None:
        """[len(requests), num_words] int32: bit t of row r allows token t; None when no row is constrained."""
        rows = [(i, self._matchers[r.request_id]) for i, r in enumerate(requests) if r.request_id in self._matchers]
        if not rows:
            return None
        bitmask = torch.full((len(requests), self.num_words), -1, dtype=torch.int32)  # all allowed
        for i, matcher in rows:
            matcher.fill_next_token_bitmask(bitmask, i)
        return bitmask

    def accept(self, request: Request, token_id: int) -> bool:
        """Advance the request's matcher (a free request: always True). False: the grammar refuses the token."""
        matcher = self._matchers.get(request.request_id)
        return matcher is None or matcher.accept_token(token_id)

    def is_terminated(self, request: Request) -> bool:
        matcher = self._matchers.get(request.request_id)
        return matcher is not None and matcher.is_terminated()

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            pending[0].waiting_for_grammar = False
