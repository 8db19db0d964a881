"""HTTP endpoints: parse and validate, call the engine, format OpenAI answers as JSON or SSE."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

import anyio
import jinja2
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from loraplex.adapters.composition import Composition, PartInfo, check_parts
from loraplex.adapters.errors import AdapterError
from loraplex.engine.core.errors import PromptTooLongError
from loraplex.engine.core.outputs import RequestOutput, TokenLogprob
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.detokenizer import decode_token_text
from loraplex.serve.errors import (
    ClientDisconnectedError,
    InvalidRequestError,
    ModelNotFoundError,
    error_json,
    error_response,
)
from loraplex.serve.metrics import CONTENT_TYPE, RequestTracker
from loraplex.serve.schemas import (
    ChatChunkChoice,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    MergeParams,
    ModelCard,
    ModelList,
    UsageInfo,
    chat_logprobs,
    choice_params,
    completion_logprobs,
    echo_logprobs,
    prompt_logprobs_field,
)
from loraplex.serve.tools import check_tool_choice, template_supports_tools
from loraplex.serve.tools import conversation as tools_conversation
from loraplex.serve.tools import parse as parse_tool_calls

logger = logging.getLogger("loraplex.serve")


# ---------------------------------------------------------------------------- models

@dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str  # the name the client asked for, echoed back in responses
    # (adapter_id, version) that serves it, or (adapter_id, version, Composition) with a lora_scale or several
    # adapters (adapters/composition.py); None is the base model
    adapter: tuple | None = None


async def resolve_model(state: Any, name: str | None) -> ResolvedModel:
    """The single place a request's `model` field is checked: a base model name, or an adapter's,
    resolved to its newest version now (the request keeps that version to its last token), or a fine-tuning
    checkpoint's `ft:...:ckpt-step-N` (published from the checkpoint on first use)."""
    served = state.served_model_names
    if name is None:
        return ResolvedModel(served[0])
    if name in served:
        return ResolvedModel(name)
    adapter = None if state.adapters is None else await state.adapters.resolve(name)
    if adapter is not None:
        return ResolvedModel(name, adapter)
    fine_tuning = getattr(state, "fine_tuning", None)
    if fine_tuning is not None:
        adapter = await fine_tuning.checkpoint_adapter(name)
        if adapter is not None:
            return ResolvedModel(name, adapter)
    raise ModelNotFoundError(name)


async def resolve_composition(state: Any, req: ChatCompletionRequest | CompletionRequest,
                              model: ResolvedModel) -> ResolvedModel:
    """The request's `lora_scale`, `adapters` and `merge` (extensions) applied to its resolved `model`: a strength
    for its adapter, or several adapters combined (then `model` names the base model). 400 for what cannot be
    served, 404 for an unknown adapter name; nothing is registered or changed by a refused request."""
    if req.adapters is None and req.lora_scale is None and req.merge is None:
        return model
    if state.adapters is None:
        raise InvalidRequestError("this server serves no adapters (LoRA is disabled)", param="adapters")
    if req.adapters is not None:
        if model.adapter is not None:
            raise InvalidRequestError(f"with `adapters`, `model` names the base model ({state.served_model_names[0]}),"
                                      f" not the adapter {model.name!r}", param="model")
        limit = state.adapters.settings.max_adapters_per_request
        if not req.adapters or len(req.adapters) > limit:
            raise InvalidRequestError(f"`adapters` must list 1 to {limit} adapters (--max-adapters-per-request), "
                                      f"got {len(req.adapters)}", param="adapters")
        parts = []
        for i, item in enumerate(req.adapters):
            part = await resolve_model(state, item.name)
            if part.adapter is None:
                raise InvalidRequestError(f"adapters[{i}]: {item.name!r} is a base model, not an adapter",
                                          param="adapters")
            parts.append((*part.adapter[:2], item.weight))
    else:
        if req.merge is not None:
            raise InvalidRequestError("`merge` combines the adapters listed in `adapters`", param="merge")
        if model.adapter is None:
            raise InvalidRequestError("lora_scale needs an adapter: name one in `model` or list them in `adapters`",
                                      param="lora_scale")
        parts = [(*model.adapter[:2], 1.0)]
    merge = req.merge or MergeParams()
    try:
        mix = Composition(tuple(parts), merge.method, merge.density, merge.majority_sign_method, merge.seed,
                          1.0 if req.lora_scale is None else req.lora_scale)
        check_parts(mix, [_part_info(state, (a, v)) for a, v, _ in parts])
    except AdapterError as e:
        raise InvalidRequestError(str(e), param=e.param or "adapters") from None
    if len(parts) == 1 and parts[0][2] == 1.0 and mix.scale == 1.0:
        return ResolvedModel(model.name, parts[0][:2])  # the adapter itself
    return ResolvedModel(model.name, (*parts[0][:2], mix))


def _part_info(state: Any, key: tuple[int, int]) -> PartInfo:
    version = state.adapters.versions.get(key)
    if version is None:  # retired between its resolution and now: the engine refuses it in turn
        return PartInfo(f"{key[0]}v{key[1]}", "lora", 0)
    return PartInfo(version.name, version.adapter_type, version.rank, None, key in state.adapters.full_modules)


def _model_card(state: Any, name: str) -> ModelCard:
    if name not in state.served_model_names:  # an adapter
        v = state.adapters.served[name]
        return ModelCard(id=name, created=int(v.created), root=name, parent=state.served_model_names[0],
                         max_model_len=state.engine.max_model_len)
    return ModelCard(id=name, created=state.created, root=name, max_model_len=state.engine.max_model_len)


async def list_models(request: Request) -> Response:
    state = request.app.state
    names = list(state.served_model_names) + ([] if state.adapters is None else state.adapters.names())
    return _json(ModelList(data=[_model_card(state, name) for name in names]))


async def get_model(request: Request) -> Response:
    state = request.app.state
    return _json(_model_card(state, (await resolve_model(state, request.path_params["model"])).name))


# ---------------------------------------------------------------------------- engine requests

@dataclass(slots=True)
class _Choice:
    """One engine request: one prompt's one sample (`n` and prompt lists fan out into several)."""
    index: int
    request_id: str
    stream: Any  # async iterator of RequestOutput deltas
    tracker: RequestTracker
    num_prompt_tokens: int
    prefix: str = ""  # echoed prompt text (completions)
    prompt_ids: list[int] = field(default_factory=list)  # echoed prompt tokens (completions)
    text_offset: int = 0  # characters emitted so far, for completions' logprobs.text_offset
    num_output_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    texts: list[str] = field(default_factory=list)  # non-streaming only
    logprobs: list[TokenLogprob] = field(default_factory=list)  # non-streaming only
    prompt_logprobs: list[TokenLogprob] | None = None  # from the first output, when asked for
    score_only: bool = False  # completions' echo with max_tokens 0: the one generated token is dropped

    def on_output(self, out: RequestOutput) -> None:
        self.tracker.on_output(out)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if self.score_only:  # the token generated to get here is not part of the answer
            out.text, out.token_ids, out.logprobs = "", [], None
            if out.finished and out.finish_reason == "stop":
                out.finish_reason, out.stop_reason = "length", None
        self.num_output_tokens = 0 if self.score_only else out.num_output_tokens
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
            logger.info("request %s finished: prompt_tokens=%d output_tokens=%d finish_reason=%s",
                        self.request_id, out.num_prompt_tokens, out.num_output_tokens, out.finish_reason)


def _check_structured_output(req: ChatCompletionRequest | CompletionRequest) -> None:
    """A bad schema, regex or grammar is a 400 naming the field before anything is queued (parsed here without the
    tokenizer; the engine compiles it for the vocabulary)."""
    try:
        constraint = req.structured_output()
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="response_format") from None
    if constraint is None:
        return
    spec, field_name = constraint
    from loraplex.engine.structured.manager import validate
    try:
        validate(spec)
    except ValueError as exc:
        raise InvalidRequestError(f"{field_name}: {exc}", param=field_name) from None


def _check_logit_bias(engine: Any, req: ChatCompletionRequest | CompletionRequest) -> None:
    vocab_size = engine.model_config.vocab_size
    bad = [k for k in req.logit_bias or {} if int(k) >= vocab_size]
    if bad:
        raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab_size}): got {', '.join(bad[:5])}",
                                  param="logit_bias")


def _with_bad_words(tokenizer: Any, req: ChatCompletionRequest | CompletionRequest,
                    params: SamplingParams) -> SamplingParams:
    """vLLM's bad_words as token sequences: each word as written and with a leading space (a word inside a text
    starts with one), both forbidden."""
    if not req.bad_words:
        return params
    sequences = set()
    for word in req.bad_words:
        if not word.strip():
            raise InvalidRequestError("bad_words must not contain empty words", param="bad_words")
        for text in (word.lstrip(), " " + word.lstrip()):
            sequences.add(tuple(tokenizer.encode(text, add_special_tokens=False)))
    return replace(params, bad_words_token_ids=tuple(sorted(s for s in sequences if s)))


def _max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int, param: str) -> int:
    """vLLM's rule: an omitted max_tokens takes the rest of the context; too much is a 400."""
    if requested is None:
        if num_prompt_tokens >= max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, your request "
                f"has {num_prompt_tokens} input tokens. Please reduce the length of the input.",
                param=param, code="context_length_exceeded")
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + requested > max_model_len:
        raise PromptTooLongError(num_prompt_tokens, requested, max_model_len)
    return requested


def _start_requests(state: Any, response_id: str, model: ResolvedModel, prompts: list[list[int]],
                    params: list[SamplingParams], n: int) -> list[_Choice]:
    """One engine request per prompt and sample; all or none are admitted."""
    choices: list[_Choice] = []
    try:
        for i, (prompt_ids, prompt_params) in enumerate(zip(prompts, params)):
            for j in range(n):
                index = i * n + j
                request_id = f"{response_id}-{index}"
                tracker = state.metrics.start_request(model.name)
                params_j = choice_params(prompt_params, j)
                stream = (state.engine.add_request(request_id, prompt_ids, params_j) if model.adapter is None
                          else state.engine.add_request(request_id, prompt_ids, params_j, adapter=model.adapter))
                choices.append(_Choice(index, request_id, aiter(stream), tracker, len(prompt_ids)))
    except BaseException:
        _abort_unfinished(state.engine, choices)
        raise
    return choices


def _abort_unfinished(engine: Any, choices: list[_Choice]) -> None:
    for c in choices:
        if not c.tracker.is_finished:
            engine.abort(c.request_id)
            c.tracker.finish("abort")
            logger.info("request %s aborted: prompt_tokens=%d output_tokens=%d",
                        c.request_id, c.num_prompt_tokens, c.num_output_tokens)


async def _next_output(choice: _Choice) -> RequestOutput | None:
    try:
        return await anext(choice.stream)
    except StopAsyncIteration:
        return None


async def _single(choice: _Choice) -> AsyncIterator[tuple[_Choice, RequestOutput | None]]:
    while True:
        out = await _next_output(choice)
        yield choice, out
        if out is None or out.finished:
            return


async def _interleave(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, RequestOutput | None]]:
    pending = {asyncio.ensure_future(_next_output(c)): c for c in choices}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: pending[f].index):
                choice = pending.pop(fut)
                out = fut.result()
                yield choice, out
                if out is not None and not out.finished:
                    pending[asyncio.ensure_future(_next_output(choice))] = choice
    finally:
        for fut in pending:
            fut.cancel()


async def _outputs(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
    """Every choice's deltas, interleaved in the order the engine produces them (no task per token
    in the common case of one choice)."""
    source = _single(choices[0]) if len(choices) == 1 else _interleave(choices)
    async with aclosing(source) as deltas:
        async for choice, out in deltas:
            if out is None:  # the stream ended without a final output: the engine dropped it
                choice.tracker.finish("abort")
                choice.finish_reason = "abort"
                continue
            choice.on_output(out)
            yield choice, out


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, state: Any, choices: list[_Choice]) -> None:
    """Run every choice to the end; a client that goes away first gets its requests aborted."""
    async def consume() -> None:
        async with aclosing(_outputs(choices)) as outputs:
            async for choice, out in outputs:
                choice.texts.append(out.text)
                choice.logprobs.extend(out.logprobs or ())

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((consumer, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not consumer.done():
            logger.info("client disconnected before its answer was ready")
            raise ClientDisconnectedError()
        consumer.result()
    finally:
        consumer.cancel()
        watcher.cancel()
        _abort_unfinished(state.engine, choices)


# ---------------------------------------------------------------------------- chat

def render_chat(tokenizer: Any, conversation: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False, tools: list[dict] | None = None) -> list[int]:
    """The chat template's prompt as token ids (the template writes any special tokens itself)."""
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, tokenize=False,
                                             tools=tools)
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"The chat template rejected the messages: {exc}", param="messages")
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_prompt_ids(tokenizer: Any, req: ChatCompletionRequest) -> list[int]:
    """The conversation through the chat template; tools through it too where it knows them (tools.py)."""
    native = bool(req.tools) and template_supports_tools(tokenizer)
    conversation = tools_conversation(req.messages, req.tools, native)
    return render_chat(tokenizer, conversation, tools=[t.model_dump(exclude_none=True) for t in req.tools]
                       if native else None)


def _chat_message(req: ChatCompletionRequest, c: _Choice, text: str) -> tuple[ChatResponseMessage, str | None]:
    """The answer as a message, its tool calls parsed out (tools.py); and its finish_reason."""
    mode = req.tool_mode
    if mode == "none":
        return ChatResponseMessage(content=text), c.finish_reason
    try:
        content, calls = parse_tool_calls(text, req.tools, mode, req.parallel_tool_calls)
    except (ValueError, KeyError, TypeError):  # a constrained answer cut short by max_tokens is not JSON yet
        return ChatResponseMessage(content=text), c.finish_reason
    finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
    return ChatResponseMessage(content=content, tool_calls=calls or None), finish


async def chat_completions(request: Request) -> Response:
    req = ChatCompletionRequest.model_validate_json(await request.body())
    state = request.app.state
    model = await resolve_composition(state, req, await resolve_model(state, req.model))
    engine = state.engine
    check_tool_choice(req.tools, req.tool_choice)
    _check_logit_bias(engine, req)
    _check_structured_output(req)
    prompt_ids = _chat_prompt_ids(engine.tokenizer, req)
    max_tokens = _max_tokens(req.requested_max_tokens, len(prompt_ids), engine.max_model_len, "messages")
    params = _with_bad_words(engine.tokenizer, req, req.to_sampling_params(max_tokens))
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    choices = _start_requests(state, response_id, model, [prompt_ids], [params], req.n)
    if req.stream:
        return _sse(_chat_stream(state, req, model.name, response_id, choices))
    await _collect(request, state, choices)
    num_top = req.top_logprobs or 0
    answers = [_chat_message(req, c, "".join(c.texts)) for c in choices]
    return _json(ChatCompletionResponse(
        id=response_id, model=model.name,
        choices=[ChatCompletionChoice(
            index=c.index, message=message, logprobs=chat_logprobs(c.logprobs, num_top) if req.logprobs else None,
            finish_reason=finish, stop_reason=c.stop_reason) for c, (message, finish) in zip(choices, answers)],
        usage=UsageInfo.of(len(prompt_ids), sum(c.num_output_tokens for c in choices)),
        prompt_logprobs=(prompt_logprobs_field(choices[0].prompt_logprobs or [])
                         if req.prompt_logprobs is not None else None)))


class _TextChunks:
    """The JSON of the per-token chunk, one choice's new text and nothing else, from a template the schema models
    serialize once per choice: the text goes in with json.dumps instead of building and dumping the models for every
    token (the HTTP process shares the cores with the engine; this is most of what it does per streamed token)."""

    _MARK = "\u0001loraplex-text\u0001"

    def __init__(self, build) -> None:
        self._build = build  # (choice index, text) -> the chunk's JSON through the models
        self._parts: dict[int, tuple[str, str] | None] = {}

    def __call__(self, index: int, text: str) -> str:
        if index not in self._parts:
            pre, mark, post = self._build(index, self._MARK).partition(json.dumps(self._MARK))
            self._parts[index] = (pre, post) if mark and self._MARK not in post else None
        parts = self._parts[index]
        if parts is None:  # the models escaped the mark some other way: keep to them
            return self._build(index, text)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]


async def _chat_stream(state: Any, req: ChatCompletionRequest, model_name: str, response_id: str,
                       choices: list[_Choice]) -> AsyncIterator[str]:
    created = int(time.time())
    num_top = req.top_logprobs or 0

    def chunk(chunk_choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return ChatCompletionChunk(id=response_id, created=created, model=model_name,
                                   choices=chunk_choices, usage=usage).model_dump_json()

    text_chunk = _TextChunks(lambda index, text: chunk([ChatChunkChoice(index=index, delta=DeltaMessage(content=text))]))

    buffered = req.tool_mode != "none"  # tool calls are known once the answer is: sent whole at its end
    try:
        for c in choices:
            yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))])
        async with aclosing(_outputs(choices)) as outputs:
            async for c, out in outputs:
                if buffered:
                    c.texts.append(out.text)
                    c.logprobs.extend(out.logprobs or ())
                    if out.finished:
                        message, finish = _chat_message(req, c, "".join(c.texts))
                        calls = [DeltaToolCall(index=i, id=call.id, type="function", function=call.function)
                                 for i, call in enumerate(message.tool_calls or ())]
                        yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(
                            content=message.content, tool_calls=calls or None),
                            logprobs=chat_logprobs(c.logprobs, num_top) if req.logprobs else None)])
                        yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(), finish_reason=finish,
                                                     stop_reason=out.stop_reason)])
                    continue
                if out.text and not req.logprobs:
                    yield text_chunk(c.index, out.text)
                elif out.text or (req.logprobs and out.logprobs):
                    logprobs = chat_logprobs(out.logprobs or [], num_top) if req.logprobs else None
                    yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(content=out.text),
                                                 logprobs=logprobs)])
                if out.finished:
                    yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(),
                                                 finish_reason=out.finish_reason, stop_reason=out.stop_reason)])
        if req.include_usage:
            yield chunk([], UsageInfo.of(choices[0].num_prompt_tokens, sum(c.num_output_tokens for c in choices)))
    except Exception as exc:  # the status line is gone already: report in-band, as vLLM does
        yield json.dumps(error_json(exc))
    finally:
        _abort_unfinished(state.engine, choices)
    yield "[DONE]"


# ---------------------------------------------------------------------------- completions

def _completion_prompts(engine: Any, prompt: str | list) -> list[tuple[list[int], str | None]]:
    """Each prompt as token ids, with its text when the client sent text."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    vocab_size = engine.model_config.vocab_size
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            ids, text = engine.tokenizer.encode(item), item
        else:
            ids, text = list(item), None
            if any(not 0 <= t < vocab_size for t in ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        if not ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        prompts.append((ids, text))
    return prompts


async def completions(request: Request) -> Response:
    req = CompletionRequest.model_validate_json(await request.body())
    state = request.app.state
    model = await resolve_composition(state, req, await resolve_model(state, req.model))
    engine = state.engine
    _check_logit_bias(engine, req)
    _check_structured_output(req)
    prompts = _completion_prompts(engine, req.prompt)
    # max_tokens 0 (echo only) runs as 1: the prompt's last row must be computed; its token is dropped
    max_tokens = 1 if req.score_only else req.max_tokens
    params = [_with_bad_words(engine.tokenizer, req,
                              req.to_sampling_params(_max_tokens(max_tokens, len(ids), engine.max_model_len, "prompt")))
              for ids, _ in prompts]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    choices = _start_requests(state, response_id, model, [ids for ids, _ in prompts], params, req.n)
    for c in choices:
        c.score_only = req.score_only
        if req.echo:
            ids, text = prompts[c.index // req.n]
            c.prefix = text if text is not None else engine.tokenizer.decode(ids)
            c.text_offset = len(c.prefix)
            c.prompt_ids = ids
    num_prompt_tokens = sum(len(ids) for ids, _ in prompts)
    if req.stream:
        return _sse(_completion_stream(state, req, model.name, response_id, choices, num_prompt_tokens))
    await _collect(request, state, choices)
    return _json(CompletionResponse(
        id=response_id, model=model.name,
        choices=[CompletionChoice(
            index=c.index, text=c.prefix + "".join(c.texts), logprobs=_choice_logprobs(engine, req, c, c.logprobs),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            prompt_logprobs=(prompt_logprobs_field(c.prompt_logprobs or [])
                             if req.prompt_logprobs is not None else None)) for c in choices],
        usage=UsageInfo.of(num_prompt_tokens, sum(c.num_output_tokens for c in choices))))


def _echo_part(engine: Any, c: _Choice, num_top: int) -> CompletionLogprobs:
    """Completions' logprobs of the echoed prompt: its first token unscored, then the engine's prompt logprobs."""
    first = decode_token_text(engine.tokenizer, c.prompt_ids[0])
    return echo_logprobs(first, c.prompt_logprobs or [], num_top)


def _choice_logprobs(engine: Any, req: CompletionRequest, c: _Choice,
                     logprobs: list[TokenLogprob]) -> CompletionLogprobs | None:
    """A whole (non-streamed) choice's logprobs: the echoed prompt's, then the completion's."""
    if req.logprobs is None:
        return None
    out = completion_logprobs(logprobs, req.logprobs, c.text_offset)
    if not req.echo:
        return out
    echo = _echo_part(engine, c, req.logprobs)
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        getattr(echo, name).extend(getattr(out, name))
    return echo


async def _completion_stream(state: Any, req: CompletionRequest, model_name: str, response_id: str,
                             choices: list[_Choice], num_prompt_tokens: int) -> AsyncIterator[str]:
    created = int(time.time())
    num_top = req.logprobs or 0

    def chunk(chunk_choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return CompletionResponse(id=response_id, created=created, model=model_name,
                                  choices=chunk_choices, usage=usage).model_dump_json()

    text_chunk = _TextChunks(lambda index, text: chunk([CompletionChoice(index=index, text=text)]))

    try:
        for c in choices:
            if c.prefix and req.logprobs is None:  # with logprobs the prefix waits for the prompt's logprobs
                yield chunk([CompletionChoice(index=c.index, text=c.prefix)])
        async with aclosing(_outputs(choices)) as outputs:
            async for c, out in outputs:
                if c.prefix and req.logprobs is not None and out.prompt_logprobs is not None:
                    yield chunk([CompletionChoice(index=c.index, text=c.prefix,
                                                  logprobs=_echo_part(state.engine, c, num_top))])
                if out.text and req.logprobs is None:
                    yield text_chunk(c.index, out.text)
                elif out.text or (req.logprobs is not None and out.logprobs):
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = completion_logprobs(out.logprobs or [], num_top, c.text_offset)
                        c.text_offset += sum(len(lp.token) for lp in out.logprobs or ())
                    yield chunk([CompletionChoice(index=c.index, text=out.text, logprobs=logprobs)])
                if out.finished:
                    yield chunk([CompletionChoice(index=c.index, text="", finish_reason=out.finish_reason,
                                                  stop_reason=out.stop_reason)])
        if req.include_usage:
            yield chunk([], UsageInfo.of(num_prompt_tokens, sum(c.num_output_tokens for c in choices)))
    except Exception as exc:  # the status line is gone already: report in-band, as vLLM does
        yield json.dumps(error_json(exc))
    finally:
        _abort_unfinished(state.engine, choices)
    yield "[DONE]"


# ---------------------------------------------------------------------------- health and metrics

async def health(request: Request) -> Response:
    if request.app.state.engine.is_healthy:
        return Response(status_code=200)
    return error_response(503, "The inference engine is not healthy.", type="service_unavailable_error",
                          code="engine_dead")


async def ready(request: Request) -> Response:
    state = request.app.state
    if state.ready and state.engine.is_healthy:
        return Response(status_code=200)
    return error_response(503, "The inference engine is not running yet.", type="service_unavailable_error",
                          code="not_ready")


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


class EventStream(StreamingResponse):
    """Server-sent events as OpenAI and vLLM send them: `data: <payload>` and a blank line per event. Nothing else
    per event (no timers, no pings: a streamed token costs one send; this loop shares the machine with the engine),
    and the events' generator is closed the moment the client goes away (its `finally` aborts the request)."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(self._frames(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @staticmethod
    async def _frames(events: AsyncIterator[str]) -> AsyncIterator[bytes]:
        async with aclosing(events):
            async for data in events:
                yield f"data: {data}\n\n".encode()

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the connection is gone
                pass
            tasks.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tasks:  # whatever the ASGI version: a disconnect stops the events
                tasks.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


def _sse(events: AsyncIterator[str]) -> EventStream:
    return EventStream(events)


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
