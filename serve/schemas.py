"""Pydantic request/response models in OpenAI's shapes (plus vLLM's sampling extras) and their builders."""
from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from loraplex.engine.core.outputs import TokenLogprob
from loraplex.engine.core.sampling_params import (
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_TOP_LOGPROBS,
    SamplingParams,
    StructuredOutput,
)
from loraplex.serve.tools import (
    ToolCall,
    ToolCallFunction,
    ToolChoice,
    ToolDefinition,
    tool_mode,
)
from loraplex.serve.tools import constraint as tool_constraint

MAX_N = 8
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
# JSON has no -inf; a token the model rules out gets vLLM's stand-in.
_MIN_LOGPROB = -9999.0


# ---------------------------------------------------------------------------- requests

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


# Request fields of OpenAI's and vLLM's APIs that loraplex does not implement (yet): sent with a value that would
# change the answer, they are a 400 naming the field, never silently dropped. Each maps to the values that change
# nothing (None is always fine). Unknown vendor fields are still ignored.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "best_of": (1,),
    "suffix": ("",),
    "guided_decoding_backend": ("xgrammar", "auto"),
}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field("response", max_length=256)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object) or json_schema."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema, strict}")
        return self


class StructuredOutputsParams(BaseModel):
    """vLLM's structured_outputs: one of json, regex, choice, grammar, json_object."""
    model_config = ConfigDict(extra="forbid")
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def specs(self) -> list[StructuredOutput]:
        out = []
        if self.json_ is not None:
            out.append(StructuredOutput("json_schema", self.json_ if isinstance(self.json_, str) else json.dumps(self.json_)))
        if self.regex is not None:
            out.append(StructuredOutput("regex", self.regex))
        if self.choice is not None:
            out.append(StructuredOutput("choice", json.dumps(self.choice)))
        if self.grammar is not None:
            out.append(StructuredOutput("grammar", self.grammar))
        if self.json_object:
            out.append(StructuredOutput("json_object"))
        return out


class AdapterWeight(BaseModel):
    """One adapter of a request's `adapters` (extension): a served name (or `name@N`) and its weight."""
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    weight: float = 1.0


class MergeParams(BaseModel):
    """How a request's `adapters` combine (extension; PEFT's add_weighted_adapter and LoRAX's merged_adapters):
    linear is Σ weight·ΔW; ties / dare_linear / dare_ties / magnitude_prune merge A and B as PEFT does."""
    model_config = ConfigDict(extra="forbid")

    method: str = "linear"
    density: float = 1.0  # the fraction of each adapter's entries kept (ties, dare_*, magnitude_prune)
    majority_sign_method: str = "total"  # ties, dare_ties: "total" or "frequency"
    seed: int = Field(0, ge=0, le=_INT64_MAX)  # DARE's random masks


class _SamplingRequest(BaseModel):
    """Fields both endpoints share; unknown fields are ignored (OpenAI clients send some)."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM extras
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # each prompt token's logprob and the k most likely tokens at its position (vLLM's prompt_logprobs)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's JSON) -> bias in [-100, 100]
    # structured output (engine/structured/): at most one of these
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None  # vLLM
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # EBNF
    structured_outputs: StructuredOutputsParams | None = None  # vLLM's newer spelling of the same
    # see UNSUPPORTED_FIELDS: accepted only with a value that changes nothing
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    store: Any = None
    service_tier: Any = None
    best_of: Any = None
    suffix: Any = None
    guided_decoding_backend: Any = None
    bad_words: list[str] | None = Field(None, max_length=256)  # vLLM: words the output never contains
    # adapters (extensions, README "Adapter strength and combinations"): the adapter's strength for this request,
    # and several adapters at once (with `model` naming the base model) combined by `merge`
    lora_scale: float | None = None
    adapters: list[AdapterWeight] | None = Field(None, max_length=64)
    merge: MergeParams | None = None

    @field_validator(*UNSUPPORTED_FIELDS)
    @classmethod
    def _not_implemented(cls, value: Any, info) -> Any:
        if value is not None and value not in UNSUPPORTED_FIELDS[info.field_name]:
            raise ValueError("is not supported by this server (see the README's list of request fields)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(value)}")
        for key, bias in value.items():
            if not key.strip().isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"values must be in [-100, 100], got {bias} for token {key}")
        return value

    @model_validator(mode="after")
    def _prompt_logprobs_not_streamed(self):
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not available with stream: true (completions: echo + logprobs "
                             "streams the prompt's logprobs)")
        return self

    def structured_output(self) -> tuple[StructuredOutput, str] | None:
        """The output constraint and the field that set it, or None. More than one is a ValueError."""
        found: list[tuple[StructuredOutput, str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append((StructuredOutput("json_object"), "response_format"))
        elif rf is not None and rf.type == "json_schema":
            found.append((StructuredOutput("json_schema", json.dumps(rf.json_schema.schema_),
                                           strict=rf.json_schema.strict is not False), "response_format"))
        if self.guided_json is not None:
            value = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            found.append((StructuredOutput("json_schema", value), "guided_json"))
        if self.guided_regex is not None:
            found.append((StructuredOutput("regex", self.guided_regex), "guided_regex"))
        if self.guided_choice is not None:
            found.append((StructuredOutput("choice", json.dumps(self.guided_choice)), "guided_choice"))
        if self.guided_grammar is not None:
            found.append((StructuredOutput("grammar", self.guided_grammar), "guided_grammar"))
        if self.structured_outputs is not None:
            found.extend((spec, "structured_outputs") for spec in self.structured_outputs.specs())
        if len(found) > 1:
            raise ValueError(f"give one output constraint, not {len(found)} ({', '.join(f for _, f in found)})")
        return found[0] if found else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        constraint = self.structured_output()
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=0 if self.top_k is None else self.top_k,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            structured_output=None if constraint is None else constraint[0],
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def tool_mode(self):
        return tool_mode(self.tools, self.tool_choice)

    def structured_output(self) -> tuple[StructuredOutput, str] | None:
        """The output constraint: response_format and friends, or the grammar of tool_choice required / a named
        function (not both)."""
        own = super().structured_output()
        tools = None if self.tool_mode == "none" else tool_constraint(self.tools, self.tool_mode,
                                                                      self.parallel_tool_calls)
        if own is not None and tools is not None:
            raise ValueError(f"tool_choice {self.tool_choice!r} already constrains the output; drop {own[1]}")
        return own if tools is None else (tools, "tool_choice")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("requires logprobs to be true")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """The one conversion for /v1/chat/completions; SamplingParams raises ValueError (-> 400)."""
        return self._sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
                                     self.prompt_logprobs)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    tools: Any = None  # chat only: refused here rather than dropped
    tool_choice: Any = None
    parallel_tool_calls: Any = None

    @field_validator("tools", "tool_choice", "parallel_tool_calls")
    @classmethod
    def _chat_only(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("is a /v1/chat/completions field")
        return value
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (with echo, as lm-eval and vLLM do)

    @model_validator(mode="after")
    def _zero_max_tokens_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (scoring the prompt); otherwise it must be at least 1")
        return self

    @property
    def score_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) alone, no completion."""
        return self.echo and self.max_tokens == 0

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler) -> Any:
        try:
            return handler(value)
        except ValidationError:  # one error per union member says little; say what is accepted
            raise ValueError("must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids") from None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        """The one conversion for /v1/completions; SamplingParams raises ValueError (-> 400). echo + logprobs k
        needs the prompt's logprobs with k alternatives; max_tokens 0 runs as 1, its token dropped."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return self._sampling_params(max(max_tokens, 1), self.logprobs, max(wanted) if wanted else None)


class TokenizeCompletionRequest(BaseModel):
    """vLLM's POST /tokenize for a prompt."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(BaseModel):
    """vLLM's POST /tokenize for chat messages, rendered by the model's chat template."""
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_of_generation_or_continue(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message exclude each other")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


def choice_params(params: SamplingParams, choice_index: int) -> SamplingParams:
    """Seeded n > 1: each choice gets seed + index (as vLLM does), so they differ but reproduce."""
    if params.seed is None or choice_index == 0:
        return params
    return replace(params, seed=params.seed + choice_index)


# ---------------------------------------------------------------------------- responses

def _without_none(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Drop vLLM extras and optional parts nobody asked for, so plain answers keep OpenAI's exact shape."""
    for key in keys:
        if data.get(key) is None:
            data.pop(key, None)
    return data


def _now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_tool_calls(self, handler) -> dict[str, Any]:
        return _without_none(handler(self), "tool_calls")


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string or token id that ended it


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra, when asked for

    @model_serializer(mode="wrap")
    def _omit_unasked_prompt_logprobs(self, handler) -> dict[str, Any]:
        return _without_none(handler(self), "prompt_logprobs")


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunction | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokenLogprob(BaseModel):
    """vLLM's entry of `prompt_logprobs`, keyed by token id."""
    logprob: float
    rank: int | None = None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra, when asked for

    @model_serializer(mode="wrap")
    def _omit_unasked_prompt_logprobs(self, handler) -> dict[str, Any]:
        return _without_none(handler(self), "prompt_logprobs")


class CompletionResponse(BaseModel):
    """Both the whole answer and each streamed chunk (OpenAI uses "text_completion" for both)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "loraplex"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------------------- logprob builders

def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def chat_logprobs(logprobs: list[TokenLogprob], num_top: int) -> ChatChoiceLogprobs:
    """Engine logprobs -> `choices[].logprobs` of a chat answer or chunk."""
    return ChatChoiceLogprobs(content=[
        ChatTokenLogprob(
            token=lp.token, logprob=_finite(lp.logprob), bytes=list(lp.token.encode("utf-8")),
            top_logprobs=[TopLogprob(token=text, logprob=_finite(value), bytes=list(text.encode("utf-8")))
                          for _, text, value in lp.top_logprobs[:num_top]])
        for lp in logprobs])


def completion_logprobs(logprobs: list[TokenLogprob], num_top: int, text_offset: int) -> CompletionLogprobs:
    """Engine logprobs -> legacy completions logprobs; offsets count characters from `text_offset`."""
    out = CompletionLogprobs()
    for lp in logprobs:
        out.tokens.append(lp.token)
        out.token_logprobs.append(_finite(lp.logprob))
        top = {text: _finite(value) for _, text, value in lp.top_logprobs[:num_top]}
        top.setdefault(lp.token, _finite(lp.logprob))  # vLLM: the sampled token is always listed
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(lp.token)
    return out


# ---------------------------------------------------------------------------- fine-tuning requests

MAX_SUFFIX_CHARS = 40
_SUFFIX_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_HYPERPARAMETER_BOUNDS = {"n_epochs": (1, 50), "batch_size": (1, 256)}
MAX_LEARNING_RATE_MULTIPLIER = 10.0
SUPPORTED_METHODS = ("supervised", "dpo")
_KNOWN_METHODS = ("supervised", "dpo", "reinforcement")
MAX_DPO_BETA = 100.0
MAX_PRIORITY = 10


class FineTuningHyperparameters(BaseModel):
    """OpenAI's hyperparameters; each is a value or "auto" (resolved by the service)."""
    model_config = ConfigDict(extra="forbid")
    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _int_or_auto(cls, value: Any, info) -> int | str:
        low, high = _HYPERPARAMETER_BOUNDS[info.field_name]
        if value is None or value == "auto":
            return "auto"
        if type(value) is not int or not low <= value <= high:
            raise ValueError(f'must be "auto" or an integer from {low} to {high}; got {value!r}')
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier_or_auto(cls, value: Any) -> float | str:
        if value is None or value == "auto":
            return "auto"
        if type(value) not in (int, float) or not 0 < value <= MAX_LEARNING_RATE_MULTIPLIER:
            raise ValueError(f'must be "auto" or a number above 0 and at most {MAX_LEARNING_RATE_MULTIPLIER:g}; '
                             f"got {value!r}")
        return float(value)


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: FineTuningHyperparameters | None = None


class DPOHyperparameters(FineTuningHyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones and beta (the KL weight, "auto": 0.1)."""
    beta: Any = "auto"

    @field_validator("beta")
    @classmethod
    def _beta_or_auto(cls, value: Any) -> float | str:
        if value is None or value == "auto":
            return "auto"
        if type(value) not in (int, float) or not 0 < value <= MAX_DPO_BETA:
            raise ValueError(f'must be "auto" or a number above 0 and at most {MAX_DPO_BETA:g}; got {value!r}')
        return float(value)


class DPOMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DPOHyperparameters | None = None


class FineTuningMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    supervised: SupervisedMethod | None = None
    dpo: DPOMethod | None = None
    reinforcement: dict | None = None

    @field_validator("type")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value in _KNOWN_METHODS and value not in SUPPORTED_METHODS:
            raise ValueError(f"the {value!r} fine-tuning method is not supported by this server; "
                             f"use {' or '.join(map(repr, SUPPORTED_METHODS))}")
        if value not in SUPPORTED_METHODS:
            raise ValueError(f"must be {' or '.join(map(repr, SUPPORTED_METHODS))}; got {value!r}")
        return value

    @field_validator("reinforcement")
    @classmethod
    def _no_reinforcement(cls, value: dict | None) -> None:
        if value is not None:
            raise ValueError("the 'reinforcement' method is not supported by this server; use 'supervised' or 'dpo'")
        return None

    @model_validator(mode="after")
    def _settings_match_type(self) -> FineTuningMethod:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} is given but method.type is {self.type!r}")
        return self


class ExpertLoRAOptions(BaseModel):
    """MixLoRA's expert overrides, as MoE-PEFT's `expert_lora`."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    r: int | None = None
    lora_alpha: float | None = None


class LoRAOptions(BaseModel):
    """Our extension field `lora`: LoRASpec's fields and trainer extras (see trainer/job_store.py);
    a field left out takes the trainer's default. LoRASpec itself checks the LoRA fields."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] | None = None
    use_rslora: bool | None = None
    use_dora: bool | None = None  # DoRA (PEFT's use_dora): served as a dora adapter, loadable by peft
    micro_batch_size: int | None = Field(None, ge=1, le=256)
    max_length: int | None = Field(None, ge=8)  # and at most the engine's max_model_len (checked by the service)
    packing: bool | None = None
    template: str | None = None  # checked by the service against trainer.data.TEMPLATES
    validation_fraction: float | None = Field(None, ge=0, lt=1)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    eval_every: int | None = Field(None, ge=0)
    checkpoint_every: int | None = Field(None, ge=0)
    early_stopping_patience: int | None = Field(None, ge=0)
    # share of the training set added as the base model's own answers to general prompts (supervised only)
    self_distillation: float | None = Field(None, ge=0, le=4)
    # train those answers towards the base's whole next-token distributions (top 32 + the rest) instead of
    # their tokens: no gradient while the adapter still is the base (trainer/multi_job.py)
    self_distillation_kl: bool | None = None
    # "mixlora": a MixLoRA adapter (LoRA experts in every FFN, trainer.lora_layers.MixLoRASpec checks these)
    type: Literal["lora", "mixlora"] | None = None
    num_experts: int | None = None
    top_k: int | None = None
    routing_strategy: str | None = None
    top_p: float | None = None
    temperature: float | None = None
    router_aux_loss_coef: float | None = None
    router_init_range: float | None = None
    jitter_noise: float | None = None
    expert_lora: ExpertLoRAOptions | None = None


class CreateFineTuningJobRequest(BaseModel):
    """POST /v1/fine_tuning/jobs: OpenAI's fields plus our `lora` extension; anything else is refused."""
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=(1 << 31) - 1, strict=True)
    hyperparameters: FineTuningHyperparameters | None = None  # deprecated by OpenAI in favour of `method`
    method: FineTuningMethod | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    lora: LoRAOptions | None = None
    priority: int = Field(0, ge=0, le=MAX_PRIORITY, strict=True)  # our extension: a larger share of training steps

    @field_validator("suffix")
    @classmethod
    def _suffix_chars(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > MAX_SUFFIX_CHARS or not set(value) <= _SUFFIX_CHARS:
            raise ValueError(f"must be at most {MAX_SUFFIX_CHARS} letters, digits, '_' or '-'; got {value!r}")
        return value or None

    @field_validator("method")
    @classmethod
    def _not_both(cls, value: FineTuningMethod | None, info) -> FineTuningMethod | None:
        if value is not None and info.data.get("hyperparameters") is not None:
            raise ValueError("give the hyperparameters in method.supervised.hyperparameters or in the deprecated "
                             "top-level hyperparameters, not both")
        return value

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("integrations (e.g. Weights & Biases) are not supported by this server")
        return None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys of at most 64 and values of at most 512 characters")
        return value

    @property
    def method_type(self) -> str:
        return self.method.type if self.method is not None else "supervised"

    def given_hyperparameters(self) -> FineTuningHyperparameters:
        if self.method is not None and self.method.type == "dpo":
            return (self.method.dpo.hyperparameters if self.method.dpo is not None else None) or DPOHyperparameters()
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters or FineTuningHyperparameters()
        return self.hyperparameters or FineTuningHyperparameters()


def prompt_logprobs_field(scored: list[TokenLogprob]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then {token id: logprob, rank, decoded_token}
    for the prompt token itself and the k most likely tokens at its position."""
    out: PromptLogprobs = [None]
    for lp in scored:
        entry = {str(t): PromptTokenLogprob(logprob=_finite(v), rank=i + 1, decoded_token=text)
                 for i, (t, text, v) in enumerate(lp.top_logprobs)}
        entry[str(lp.token_id)] = PromptTokenLogprob(logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=lp.token)
        out.append(entry)
    return out


def echo_logprobs(first_token: str, scored: list[TokenLogprob], num_top: int) -> CompletionLogprobs:
    """The prompt part of completions' logprobs with echo: every prompt token, the first with null logprob and
    null top_logprobs (as OpenAI and vLLM), offsets from 0."""
    out = completion_logprobs(scored, num_top, len(first_token))
    out.tokens.insert(0, first_token)
    out.token_logprobs.insert(0, None)
    out.top_logprobs.insert(0, None)
    out.text_offset.insert(0, 0)
    return out
