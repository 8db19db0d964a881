"""Training data: parse and validate uploaded files, render prompts, tokenize with a loss mask, pack.

Formats: OpenAI chat JSONL (`{"messages": [...]}`, assistant messages may carry `"weight": 0|1`),
OpenAI's legacy `{"prompt", "completion"}` JSONL, Alpaca JSON or JSONL (`instruction`, `input`,
`output`) and raw text. Files arrive over HTTP, so parsing is strict and bounded, every problem is a
`DataError` naming its line, and nothing is unpickled or evaluated: the only decoder is `json`.

Labels follow the Hugging Face convention: aligned with `input_ids`, -100 where no loss is taken; the
loss shifts them by one inside each example, so an example's first label is always -100 (nothing
predicts it) and `count_trained_tokens` is exactly the number of loss terms.

References: OpenAI fine-tuning data format (chat, `weight`, legacy prompt/completion); Stanford Alpaca's
prompts; TRL's assistant-only loss (`DataCollatorForCompletionOnlyLM`, `return_assistant_tokens_mask`);
HF `DataCollatorWithFlattening` for packing with per-example boundaries.
"""
from __future__ import annotations

import json
import random
import re
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("chat", "alpaca", "prompt_completion", "text", "preference")
KINDS = ("chat", "prompt_completion", "text", "preference")
_TOOL_KEYS = ("tools", "functions", "tool_calls", "function_call")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")

T = TypeVar("T")


class DataError(ValueError):
    """A problem with uploaded training data, worded for the person who uploaded it."""


@dataclass(frozen=True, slots=True)
class Example:
    kind: str  # "chat" | "prompt_completion" | "text"
    messages: tuple[dict, ...] | None = None  # chat: {"role", "content"} and, on assistants, "weight"
    prompt: str | None = None  # prompt_completion: the prompt, or Alpaca's instruction
    completion: str | None = None
    text: str | None = None
    input: str | None = None  # Alpaca's optional input, kept apart for the alpaca template's with-input prompt
    preferred: tuple[dict, ...] | None = None  # preference: the preferred output's messages (after `messages`)
    non_preferred: tuple[dict, ...] | None = None
    line: int | None = field(default=None, compare=False)  # first line in the file, for error messages

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Example kind must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # input_ids where trained, IGNORE_INDEX elsewhere

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")


@dataclass(frozen=True, slots=True)
class SoftTargets:
    """A teacher's distribution at each trained position of a sequence (in target order), kept as its top k
    tokens: `ids` [num_targets, k], `probs` [num_targets, k] (float32) and `tail` [num_targets], the mass
    outside the top k, so the distillation loss sees the whole distribution as k + 1 outcomes."""
    ids: torch.Tensor
    probs: torch.Tensor
    tail: torch.Tensor


@dataclass(frozen=True, slots=True)
class PackedSequence:
    input_ids: list[int]
    labels: list[int]
    seq_lens: list[int]  # lengths of the examples laid end to end; attention stays inside each
    soft: SoftTargets | None = None  # trained towards these distributions instead of the labels' tokens

    def __post_init__(self):
        if not len(self.input_ids) == len(self.labels) == sum(self.seq_lens):
            raise ValueError(f"{len(self.input_ids)} input ids, {len(self.labels)} labels and seq_lens "
                             f"summing to {sum(self.seq_lens)} must agree")


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A DPO unit: the same prompt with its preferred and its non-preferred output."""
    chosen: PackedSequence  # prompt + preferred output (labels on the output only)
    rejected: PackedSequence  # prompt + non-preferred output


@dataclass(frozen=True, slots=True)
class DatasetStats:
    format: str
    num_examples: int  # parsed from the file
    num_dropped: int  # no trained token left within max_length
    num_sequences: int  # rows after packing (= examples kept, without packing)
    num_tokens: int
    num_trained_tokens: int


# --- parsing ---------------------------------------------------------------------------------------

def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        text = data
    else:
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"line {line}: the file is not valid UTF-8 (byte {e.start})") from None
    return text.removeprefix("\ufeff")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _LineCounter:
    """Line number of an offset in `text`, for offsets asked in increasing order (linear overall)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _json_error(line: int, e: Exception) -> DataError:
    if isinstance(e, json.JSONDecodeError):
        return DataError(f"line {line}: invalid JSON ({e.msg} at column {e.colno})")
    if isinstance(e, RecursionError):
        return DataError(f"line {line}: JSON nested too deeply")
    return DataError(f"line {line}: invalid JSON ({e})")  # NaN/Infinity, integers past Python's digit limit


def _jsonl_records(text: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() would cut
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield number, decoder.decode(line)
        except (ValueError, RecursionError) as e:
            raise _json_error(number, e) from None


def _array_records(text: str, pos: int) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    lines = _LineCounter(text)
    pos = _JSON_SPACE.match(text, pos + 1).end()
    if not text.startswith("]", pos):
        while True:
            number = lines.at(pos)
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise _json_error(e.lineno, e) from None
            except (ValueError, RecursionError) as e:
                raise _json_error(number, e) from None
            yield number, value
            pos = _JSON_SPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _JSON_SPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                break
            else:
                raise DataError(f"line {lines.at(pos)}: invalid JSON (expected ',' or ']' after an array element)")
    pos = _JSON_SPACE.match(text, pos + 1).end()
    if pos != len(text):
        raise DataError(f"line {lines.at(pos)}: invalid JSON (unexpected data after the top-level array)")


def _records(text: str) -> Iterator[tuple[int, Any]]:
    start = len(text) - len(text.lstrip())
    return _array_records(text, start) if text.startswith("[", start) else _jsonl_records(text)


def _looks_like_json(text: str) -> bool:
    return text.lstrip()[:1] in ("{", "[")


def _record_format(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if "messages" in value:
        return "chat"
    if "input" in value and ("preferred_output" in value or "non_preferred_output" in value):
        return "preference"
    if "instruction" in value or "output" in value:
        return "alpaca"
    if "prompt" in value or "completion" in value:
        return "prompt_completion"
    if "text" in value:
        return "text"
    return None


def detect_format(data: bytes | str) -> str:
    """"chat", "alpaca", "prompt_completion" or "text", from the first record. A file whose first
    non-blank character is `{` or `[` is read as JSON Lines or a JSON array (and must be valid);
    anything else is plain text."""
    text = _decode(data)
    if not text.strip():
        raise DataError("the file is empty")
    if not _looks_like_json(text):
        return "text"
    for number, value in _records(text):
        fmt = _record_format(value)
        if fmt is None:
            raise DataError(f"line {number}: cannot tell the data format: expected a JSON object with 'messages' "
                            "(chat), 'input', 'preferred_output' and 'non_preferred_output' (preference), "
                            "'instruction' and 'output' (Alpaca), 'prompt' and 'completion', or 'text'")
        return fmt
    raise DataError("the file has no examples")


def _is_text_jsonl(text: str) -> bool:
    """Whether a file given as raw text is really JSON records with a "text" field."""
    if not _looks_like_json(text):
        return False
    try:
        first = next(_records(text), (0, None))[1]
    except DataError:
        return False
    return _record_format(first) == "text"


def _string(record: dict, key: str, where: str, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(f"{where}: missing '{key}'")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {_json_type(value)}")
    return value


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: only text can be trained on
        texts = []
        for j, part in enumerate(value, 1):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(f'{where}: content part {j} must be {{"type": "text", "text": "..."}} '
                                "(only text parts are supported)")
            texts.append(part["text"])
        return "".join(texts)
    if value is None:
        raise DataError(f"{where} has no 'content'")
    raise DataError(f"{where}: 'content' must be a string or a list of text parts, got {_json_type(value)}")


def _chat_example(record: dict, line: int) -> Example:
    for key in _TOOL_KEYS:
        if key in record:
            raise DataError(f"line {line}: '{key}' is not supported; examples may hold text messages only")
    out, num_trained = _messages(record.get("messages"), line, "messages")
    if not num_trained:
        raise DataError(f"line {line}: no assistant message to train on (an example needs at least one "
                        "assistant message without \"weight\": 0)")
    return Example(kind="chat", messages=tuple(out), line=line)


def _preference_example(record: dict, line: int) -> Example:
    """OpenAI's preference format: {"input": {"messages": [...]}, "preferred_output": [assistant message],
    "non_preferred_output": [assistant message]}."""
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in record:
            raise DataError(f"line {line}: missing '{key}' (a preference example has 'input', "
                            "'preferred_output' and 'non_preferred_output')")
    source = record["input"]
    if not isinstance(source, dict):
        raise DataError(f"line {line}: 'input' must be an object with 'messages', got {_json_type(source)}")
    for key in _TOOL_KEYS:
        if source.get(key):
            raise DataError(f"line {line}: input '{key}' is not supported; examples may hold text messages only")
    messages, _ = _messages(source.get("messages"), line, "input.messages")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"line {line}: input.messages must end with a user (or system/tool) message: the outputs "
                        "are the assistant's answer to it")
    outputs = []
    for key in ("preferred_output", "non_preferred_output"):
        out, _ = _messages(record[key], line, key)
        if len(out) != 1 or out[0]["role"] != "assistant" or "weight" in out[0]:
            raise DataError(f"line {line}: '{key}' must be a list of one assistant message")
        outputs.append(tuple(out))
    return Example(kind="preference", messages=tuple({k: v for k, v in m.items() if k != "weight"} for m in messages),
                   preferred=outputs[0], non_preferred=outputs[1], line=line)


def _messages(messages: Any, line: int, name: str) -> tuple[list[dict], int]:
    """Validated text messages and how many are trained assistant messages."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"line {line}: '{name}' must be a non-empty list of messages")
    out, num_trained = [], 0
    for i, message in enumerate(messages, 1):
        where = f"line {line}: {name} message {i}" if name != "messages" else f"line {line}: message {i}"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content', got {_json_type(message)}")
        for key in _TOOL_KEYS:
            if key in message:
                raise DataError(f"{where}: '{key}' is not supported; examples may hold text messages only")
        role = message.get("role")
        if role is None:
            raise DataError(f"{where} has no 'role'")
        if role not in ROLES:
            raise DataError(f"{where} has role {role!r} (expected {', '.join(ROLES)})")
        clean = {"role": role, "content": _content(message.get("content"), where)}
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                raise DataError(f"{where}: 'weight' is only allowed on assistant messages, not on {role}")
            if type(weight) is not int or weight not in (0, 1):
                raise DataError(f"{where}: 'weight' must be 0 or 1, got {json.dumps(weight)}")
            clean["weight"] = weight
        num_trained += role == "assistant" and clean.get("weight", 1) == 1
        out.append(clean)
    return out, num_trained


def _alpaca_example(record: dict, line: int) -> Example:
    where = f"line {line}"
    instruction = _string(record, "instruction", where)
    output = _string(record, "output", where)
    extra = _string(record, "input", where, required=False)
    return Example(kind="prompt_completion", prompt=instruction, completion=output, input=extra or None, line=line)


def _prompt_completion_example(record: dict, line: int) -> Example:
    where = f"line {line}"
    return Example(kind="prompt_completion", prompt=_string(record, "prompt", where),
                   completion=_string(record, "completion", where), line=line)


def _text_example(record: dict, line: int) -> Example:
    text = _string(record, "text", f"line {line}")
    if not text.strip():
        raise DataError(f"line {line}: 'text' is empty")
    return Example(kind="text", text=text, line=line)


_KEYS = MappingProxyType({"chat": ("messages",), "alpaca": ("instruction", "output"),
                         "prompt_completion": ("prompt", "completion"), "text": ("text",),
                         "preference": ("input", "preferred_output", "non_preferred_output")})
_PARSERS: MappingProxyType[str, Callable[[dict, int], Example]] = MappingProxyType({
    "chat": _chat_example, "alpaca": _alpaca_example, "prompt_completion": _prompt_completion_example,
    "text": _text_example, "preference": _preference_example})


def _plain_documents(text: str) -> Iterator[tuple[int, str]]:
    """Documents separated by blank lines, each with the line it starts on."""
    doc: list[str] = []
    start = 0
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if line.strip():
            start = start if doc else number
            doc.append(line)
        elif doc:
            yield start, "\n".join(doc).strip()
            doc = []
    if doc:
        yield start, "\n".join(doc).strip()


def parse_examples(data: bytes | str, fmt: str = "auto", max_examples: int = 1_000_000) -> list[Example]:
    """Validate a whole training file and return its examples; raise DataError at the first problem."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} (expected auto, {', '.join(FORMATS)})")
    text = _decode(data)
    if not text.strip():
        raise DataError("the file is empty")
    if fmt == "auto":
        fmt = detect_format(text)
    if fmt == "text" and not _is_text_jsonl(text):
        items: Iterator[tuple[int, Any]] = ((n, {"text": doc}) for n, doc in _plain_documents(text))
    else:
        items = _records(text)
    parse = _PARSERS[fmt]
    examples: list[Example] = []
    for number, record in items:
        if len(examples) == max_examples:
            raise DataError(f"line {number}: too many examples (at most {max_examples} per file)")
        if not isinstance(record, dict):
            raise DataError(f"line {number}: expected a JSON object, got {_json_type(record)}")
        if not any(key in record for key in _KEYS[fmt]):
            raise DataError(f"line {number}: expected {' and '.join(map(repr, _KEYS[fmt]))} ({fmt} format)")
        examples.append(parse(record, number))
    if not examples:
        raise DataError("the file has no examples")
    return examples


# --- prompt templates ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """How an example becomes text. Conversation templates ("chat": the tokenizer's own, "chatml") render
    whole conversations, and prompt/completion pairs as a user turn and an assistant turn; completion
    templates ("alpaca", "plain") render a prompt that the completion follows verbatim."""
    name: str
    is_conversation: bool
    prompt_format: str = "{instruction}"
    prompt_with_input_format: str = "{instruction}\n\n{input}"

    def format_prompt(self, instruction: str, input: str | None = None) -> str:
        if input:
            return self.prompt_with_input_format.format(instruction=instruction, input=input)
        return self.prompt_format.format(instruction=instruction)


_ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

TEMPLATES: MappingProxyType[str, PromptTemplate] = MappingProxyType({t.name: t for t in (
    PromptTemplate("chat", is_conversation=True),
    PromptTemplate("chatml", is_conversation=True),
    PromptTemplate("alpaca", is_conversation=False, prompt_format=_ALPACA_PROMPT,
                   prompt_with_input_format=_ALPACA_PROMPT_WITH_INPUT),
    PromptTemplate("plain", is_conversation=False),
)})


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r} (expected {', '.join(TEMPLATES)})")
    return TEMPLATES[template]


def render_chatml(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


Renderer = Callable[[list[dict], bool], str]


def _renderer(template: PromptTemplate, tokenizer) -> Renderer:
    if template.name == "chatml":
        return render_chatml
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the base model's tokenizer has no chat template; use the 'chatml', 'alpaca' or "
                        "'plain' prompt template")

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # the template is the model's own Jinja: any failure is about this conversation
            raise DataError(f"the chat template cannot render this conversation: {e}") from None
    return render


# --- tokenization ----------------------------------------------------------------------------------

def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text, without the tokenizer's own special tokens; one batched call (the Rust
    tokenizer spreads a batch over threads)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text by itself (a BOS for Llama-style tokenizers, none for SmolLM2);
    added for our own templates, never for the model's chat template, whose text already holds them."""
    (plain,) = _encode(tokenizer, ["a"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    return []


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


def _turn_end(ids: list[int], start: int, stop: int, special: set[int], tokenizer) -> int:
    """End of an assistant turn's trained span: through the end-of-turn token, without the whitespace
    some templates write after it (ChatML's "\\n" after <|im_end|>), which leads into the next header and
    is never generated."""
    end = stop
    while end > start and ids[end - 1] not in special and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end if start < end < stop and ids[end - 1] in special else stop


def _conversation_ids(messages: Sequence[dict], render: Renderer, encode: Callable[[list[str]], list[list[int]]],
                      special: set[int], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation: each trained assistant turn is located by rendering the
    conversation up to it with and without that turn and diffing the token ids."""
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    texts = [render(turns, False)]
    for i in trained:  # up to and including turn i's assistant header; then through turn i
        texts += [render(turns[:i], True), render(turns[:i + 1], False)]
    ids, *prefixes = encode(texts)
    labels = [IGNORE_INDEX] * len(ids)
    for i, before, through in zip(trained, prefixes[0::2], prefixes[1::2]):
        if through[:len(before)] != before or ids[:len(through)] != through:
            raise DataError(f"message {i + 1}: the chat template renders earlier turns differently once later "
                            "turns follow, so the assistant tokens cannot be located; use the 'chatml' prompt "
                            "template instead")
        end = _turn_end(through, len(before), len(through), special, tokenizer)
        labels[len(before):end] = through[len(before):end]
    return ids, labels


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the base model's tokenizer has no end-of-sequence token")
    return tokenizer.eos_token_id


def tokenize_example(example: Example, tokenizer, template: str | PromptTemplate = "chat",
                     max_length: int = 2048) -> TokenizedExample | None:
    """Token ids and labels of one example, truncated to its first `max_length` tokens and cut after
    its last trained token (later tokens cannot change the loss). None when no trained token is left.

    chat: every assistant message without weight 0 is trained, with its end-of-turn token;
    prompt_completion: the completion and an EOS (or the assistant turn, under a conversation template);
    text: every token, with an EOS after the document."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    tpl = get_template(template)
    try:
        ids, labels = _tokenize(example, tokenizer, tpl)
    except DataError as e:
        if example.line is None:
            raise
        raise DataError(f"line {example.line}: {e}") from None
    if ids:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
    trained = [i for i, label in enumerate(labels[:max_length]) if label != IGNORE_INDEX]
    if not trained:
        return None
    return TokenizedExample(input_ids=ids[:trained[-1] + 1], labels=labels[:trained[-1] + 1])


def _tokenize(example: Example, tokenizer, tpl: PromptTemplate) -> tuple[list[int], list[int]]:
    if example.kind == "text":  # the same under every template
        ids = _special_prefix(tokenizer) + _encode(tokenizer, [example.text])[0] + [_eos_id(tokenizer)]
        return ids, list(ids)
    prefix = [] if tpl.name == "chat" else _special_prefix(tokenizer)

    def encode(texts: list[str]) -> list[list[int]]:
        return [prefix + ids for ids in _encode(tokenizer, texts)]

    if example.kind == "chat" and not tpl.is_conversation:
        raise DataError(f"the {tpl.name!r} prompt template renders prompt/completion pairs; chat examples need "
                        "the 'chat' or 'chatml' template")
    if tpl.is_conversation:
        messages = example.messages if example.kind == "chat" else (
            {"role": "user", "content": TEMPLATES["plain"].format_prompt(example.prompt, example.input)},
            {"role": "assistant", "content": example.completion})
        return _conversation_ids(messages, _renderer(tpl, tokenizer), encode, _special_ids(tokenizer), tokenizer)
    prompt, completion = _encode(tokenizer, [tpl.format_prompt(example.prompt, example.input), example.completion])
    prompt, completion = prefix + prompt, completion + [_eos_id(tokenizer)]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


# --- packing, splitting, batching ------------------------------------------------------------------

def to_sequences(examples: Sequence[TokenizedExample]) -> list[PackedSequence]:
    """No packing: each example its own row."""
    return [PackedSequence(input_ids=list(e.input_ids), labels=list(e.labels), seq_lens=[len(e.input_ids)])
            for e in examples]


def pack_examples(examples: Sequence[TokenizedExample], max_length: int) -> list[PackedSequence]:
    """Whole examples packed into rows of at most `max_length` tokens, best-fit decreasing (deterministic);
    seq_lens keeps the example boundaries so attention and the label shift stay inside each example."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    for i, e in enumerate(examples):
        if not 0 < len(e.input_ids) <= max_length:
            raise ValueError(f"example {i} has {len(e.input_ids)} tokens; packing needs 1 to {max_length}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted: the best fit is a bisect away
    for i in order:
        size = len(examples[i].input_ids)
        k = bisect_left(room, (size, -1))
        free, row = room.pop(k) if k < len(room) else (max_length, len(rows))
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        if free > size:
            insort(room, (free - size, row))
    return [PackedSequence(input_ids=[t for i in row for t in examples[i].input_ids],
                           labels=[t for i in row for t in examples[i].labels],
                           seq_lens=[len(examples[i].input_ids) for i in row]) for row in rows]


def split_validation(examples: Sequence[T], fraction: float = 0.1, seed: int = 0,
                     max_valid: int = 256) -> tuple[list[T], list[T]]:
    """(train, valid) by a seeded shuffle, each kept in file order. At least one validation example when
    there are two or more (unless fraction or max_valid is 0), none for one, never more than max_valid."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    num_valid = 0 if n < 2 or fraction == 0 or max_valid <= 0 else min(max_valid, n - 1, max(1, round(n * fraction)))
    order = list(range(n))
    random.Random(f"valid:{seed}").shuffle(order)
    chosen = set(order[:num_valid])
    return ([e for i, e in enumerate(examples) if i not in chosen],
            [e for i, e in enumerate(examples) if i in chosen])


def iter_batches(sequences: Sequence[PackedSequence], batch_size: int, seed: int,
                 epoch: int) -> Iterator[list[PackedSequence]]:
    """One epoch in an order fixed by (seed, epoch); the last batch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(sequences)))
    random.Random(f"epoch:{seed}:{epoch}").shuffle(order)  # str seeds hash with SHA-512: stable across runs
    for start in range(0, len(order), batch_size):
        yield [sequences[i] for i in order[start:start + batch_size]]


def count_trained_tokens(sequences: Sequence[PackedSequence | TokenizedExample]) -> int:
    return sum(sum(1 for label in s.labels if label != IGNORE_INDEX) for s in sequences)


def load_dataset(data: bytes | str, tokenizer, fmt: str = "auto", template: str | PromptTemplate = "chat",
                 max_length: int = 2048, packing: bool = False,
                 max_examples: int = 1_000_000) -> tuple[list[PackedSequence], DatasetStats]:
    """Parse, tokenize and (optionally) pack a training file; examples with no trained token left within
    max_length are dropped and counted."""
    tpl = get_template(template)
    fmt = detect_format(data) if fmt == "auto" else fmt
    if fmt == "preference":
        raise DataError("this is preference data (input, preferred_output, non_preferred_output): train it "
                        "with the DPO method")
    examples = parse_examples(data, fmt, max_examples=max_examples)
    if tpl.name == "chat":
        _renderer(tpl, tokenizer)  # fail once, up front, when there is no chat template
    tokenized = [t for t in (tokenize_example(e, tokenizer, tpl, max_length) for e in examples) if t is not None]
    if not tokenized:
        raise DataError(f"no example keeps a token to train on within max_length={max_length}")
    sequences = pack_examples(tokenized, max_length) if packing else to_sequences(tokenized)
    stats = DatasetStats(format=fmt, num_examples=len(examples), num_dropped=len(examples) - len(tokenized),
                         num_sequences=len(sequences), num_tokens=sum(len(s.input_ids) for s in sequences),
                         num_trained_tokens=count_trained_tokens(sequences))
    return sequences, stats


def preference_sequences(example: Example, tokenizer, template: str | PromptTemplate = "chat",
                         max_length: int = 2048) -> tuple[PackedSequence, PackedSequence] | None:
    """(prompt + preferred output, prompt + non-preferred output), labels on the output turn only; None when
    either keeps no trained token within max_length."""
    if example.kind != "preference":
        raise ValueError(f"expected a preference example, got {example.kind!r}")
    prompt = tuple({**m, "weight": 0} if m["role"] == "assistant" else m for m in example.messages)
    out = []
    for output in (example.preferred, example.non_preferred):
        tokenized = tokenize_example(Example(kind="chat", messages=prompt + output, line=example.line), tokenizer,
                                     template, max_length)
        if tokenized is None:
            return None
        out += to_sequences([tokenized])
    return out[0], out[1]


def load_preference_dataset(data: bytes | str, tokenizer, template: str | PromptTemplate = "chat",
                            max_length: int = 2048, max_examples: int = 1_000_000) -> tuple[list, DatasetStats]:
    """Parse and tokenize a preference file (OpenAI's DPO format) -> ([(chosen, rejected)], stats)."""
    tpl = get_template(template)
    if not tpl.is_conversation:
        raise DataError(f"preference data needs the 'chat' or 'chatml' template, not {tpl.name!r}")
    if detect_format(data) != "preference":
        raise DataError("DPO needs preference data: JSON lines with 'input', 'preferred_output' and "
                        "'non_preferred_output'")
    examples = parse_examples(data, "preference", max_examples=max_examples)
    if tpl.name == "chat":
        _renderer(tpl, tokenizer)
    pairs = [PreferencePair(*p) for p in (preference_sequences(e, tokenizer, tpl, max_length) for e in examples)
             if p is not None]
    if not pairs:
        raise DataError(f"no preference example keeps a token to train on within max_length={max_length}")
    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    stats = DatasetStats(format="preference", num_examples=len(examples), num_dropped=len(examples) - len(pairs),
                         num_sequences=len(seqs), num_tokens=sum(len(s.input_ids) for s in seqs),
                         num_trained_tokens=count_trained_tokens(seqs))
    return pairs, stats
