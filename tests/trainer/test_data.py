"""Training data: format detection, strict validation with line numbers, loss masks under every template
(checked on the default model's real tokenizer), truncation, packing, the validation split and batching."""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import transformers

from loraplex.trainer.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    PackedSequence,
    TokenizedExample,
    count_trained_tokens,
    detect_format,
    get_template,
    iter_batches,
    load_dataset,
    pack_examples,
    parse_examples,
    split_validation,
    to_sequences,
    tokenize_example,
)

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n")


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(default_model_dir))


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def chat(*turns, **extra) -> dict:
    return {"messages": [dict(role=role, content=content, **({"weight": w} if w is not None else {}))
                         for role, content, w in turns], **extra}


def trained_spans(tok, ex: TokenizedExample) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label == IGNORE_INDEX:
            if run:
                spans.append(run)
            run = []
        else:
            assert label == token
            run.append(token)
    if run:
        spans.append(run)
    return [tok.decode(s) for s in spans]


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- formats --------------------------------------------------------------------------------------

def test_chat_jsonl_parsed_and_detected():
    data = jsonl(chat(("system", "Be brief.", None), ("user", "Hi", None), ("assistant", "Hello", 0),
                      ("user", "More", None), ("assistant", "Sure", 1)),
                 {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                           {"type": "text", "text": "b"}]},
                               {"role": "assistant", "content": "c"}]})
    assert detect_format(data) == "chat"
    first, second = parse_examples("\n" + data + "\n\n")  # blank lines skipped, line numbers kept
    assert first.kind == "chat" and first.line == 2 and second.line == 3
    assert first.messages[2] == {"role": "assistant", "content": "Hello", "weight": 0}
    assert first.messages[0] == {"role": "system", "content": "Be brief."}
    assert second.messages[0]["content"] == "ab"  # text parts joined


def test_alpaca_json_array_and_jsonl():
    records = [{"instruction": "Add", "input": "2 and 2", "output": "4"},
               {"instruction": "Greet", "input": "", "output": "hi"},
               {"instruction": "Wave", "output": "o/"}]
    expected = [Example(kind="prompt_completion", prompt="Add", input="2 and 2", completion="4"),
                Example(kind="prompt_completion", prompt="Greet", completion="hi"),
                Example(kind="prompt_completion", prompt="Wave", completion="o/")]
    for data in (json.dumps(records, indent=2), jsonl(*records)):
        assert detect_format(data) == "alpaca"
        assert parse_examples(data) == expected
    assert [e.line for e in parse_examples(json.dumps(records, indent=2))] == [2, 7, 12]


def test_prompt_completion_and_text_formats():
    data = jsonl({"prompt": "Q:", "completion": " A"})
    assert detect_format(data) == "prompt_completion"
    assert parse_examples(data) == [Example(kind="prompt_completion", prompt="Q:", completion=" A")]
    data = jsonl({"text": "one"}, {"text": "two"})
    assert detect_format(data) == "text"
    assert [e.text for e in parse_examples(data)] == ["one", "two"]


def test_plain_text_documents():
    data = "First doc\nstill first\r\n\r\n\n  \nSecond doc\n"
    assert detect_format(data) == "text"
    examples = parse_examples(data.encode())
    assert [(e.kind, e.text, e.line) for e in examples] == [("text", "First doc\nstill first", 1),
                                                            ("text", "Second doc", 6)]
    assert [e.text for e in parse_examples("no blank lines\nat all")] == ["no blank lines\nat all"]
    # an explicit text format reads a file that merely starts with a brace as plain text
    assert [e.text for e in parse_examples("{not json} but prose", fmt="text")] == ["{not json} but prose"]


def test_bytes_with_bom():
    data = "\ufeff".encode() + jsonl({"text": "héllo"}).encode()
    assert parse_examples(data)[0].text == "héllo"


@pytest.mark.parametrize("data, message", [
    ('{"text": "ok"}\n{"text": "bad"\n', r"line 2: invalid JSON"),
    ('{"text": "ok"}\n{"text": NaN}\n', r"line 2: invalid JSON"),
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }\n]', r"line 3: invalid JSON"),
    ('[{"instruction": "a", "output": "b"}] trailing', r"line 1: invalid JSON \(unexpected data"),
    ('{"instruction": "a", "output": 3}\n', r"line 1: 'output' must be a string, got a number"),
    ('{"instruction": "a"}\n', r"line 1: missing 'output'"),
    ('{"prompt": "a", "completion": null}\n', r"line 1: missing 'completion'"),
    ('{"text": "a"}\n["x"]\n', r"line 2: expected a JSON object, got an array"),
    ('{"text": "a"}\n{"messages": []}\n', r"line 2: expected 'text' \(text format\)"),
    ('{"text": "   "}\n', r"line 1: 'text' is empty"),
    ('{"foo": 1}\n', r"line 1: cannot tell the data format"),
    (jsonl(chat(("user", "a", None), ("assistant", "b", None)), {"messages": "hi"}),
     r"line 2: 'messages' must be a non-empty list"),
    (jsonl(chat(("user", "a", None), ("robot", "b", None))),
     r"line 1: message 2 has role 'robot' \(expected system, user, assistant, tool\)"),
    (jsonl({"messages": [{"content": "a"}]}), r"line 1: message 1 has no 'role'"),
    (jsonl({"messages": [{"role": "user"}]}), r"line 1: message 1 has no 'content'"),
    (jsonl({"messages": [{"role": "user", "content": 5}]}), r"line 1: message 1: 'content' must be a string"),
    (jsonl({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
     r"line 1: message 1: content part 1"),
    (jsonl({"messages": ["hi"]}), r"line 1: message 1 must be an object"),
    (jsonl(chat(("user", "a", None), ("assistant", "b", 2))), r"line 1: message 2: 'weight' must be 0 or 1, got 2"),
    (jsonl(chat(("user", "a", None), ("assistant", "b", True))), r"line 1: message 2: 'weight' must be 0 or 1"),
    (jsonl(chat(("user", "a", 1), ("assistant", "b", None))),
     r"line 1: message 1: 'weight' is only allowed on assistant messages"),
    (jsonl(chat(("user", "a", None), ("assistant", "b", None)), chat(("user", "a", None), ("assistant", "b", 0))),
     r"line 2: no assistant message to train on"),
    (jsonl(chat(("system", "s", None), ("user", "a", None))), r"line 1: no assistant message to train on"),
    (jsonl({"messages": [{"role": "assistant", "content": None, "tool_calls": []}]}),
     r"line 1: message 1: 'tool_calls' is not supported"),
    (jsonl(chat(("user", "a", None), ("assistant", "b", None), tools=[])), r"line 1: 'tools' is not supported"),
    ("[]", r"no examples"),
    ("", r"empty"),
    (" \n\n \n", r"empty"),
    (b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff"}\n', r"line 3: the file is not valid UTF-8"),
    ("[" * 100_000, r"line 1: (JSON nested too deeply|invalid JSON)"),
])
def test_malformed_input_names_the_line(data, message):
    with pytest.raises(DataError, match=message):
        parse_examples(data)


def test_too_many_examples():
    data = jsonl(*({"text": str(i)} for i in range(3)))
    assert len(parse_examples(data, max_examples=3)) == 3
    with pytest.raises(DataError, match=r"line 3: too many examples \(at most 2"):
        parse_examples(data, max_examples=2)
    with pytest.raises(DataError, match=r"line 5: too many examples"):
        parse_examples("a\n\nb\n\nc", max_examples=2)


def test_unknown_format_or_template_is_a_value_error():
    with pytest.raises(ValueError, match="unknown data format"):
        parse_examples("x", fmt="csv")
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("vicuna")


# --- loss masks -----------------------------------------------------------------------------------

CONVERSATION = chat(("system", "You answer in one line.", None), ("user", "Hi!", None),
                    ("assistant", "Hello there!", None), ("user", "What is 2+2?", None),
                    ("assistant", "Five.", 0), ("user", "Try again.", None),
                    ("assistant", "It is 4.", 1), ("user", "Thanks", None))


def test_chat_mask_is_assistant_content_and_end_token(tok):
    (example,) = parse_examples(jsonl(CONVERSATION))
    out = tokenize_example(example, tok, "chat")
    assert trained_spans(tok, out) == ["Hello there!<|im_end|>", "It is 4.<|im_end|>"]
    # the ids are the model's own chat template rendering, cut after the last trained token
    full = encode(tok, tok.apply_chat_template(CONVERSATION["messages"], tokenize=False))
    assert out.input_ids == full[:len(out.input_ids)]
    assert tok.decode(out.input_ids).endswith("<|im_start|>assistant\nIt is 4.<|im_end|>")
    assert count_trained_tokens([out]) == len(encode(tok, "Hello there!")) + len(encode(tok, "It is 4.")) + 2


def test_chatml_template_has_no_default_system_prompt(tok):
    example = parse_examples(jsonl(chat(("user", "Hi", None), ("assistant", "Yo", None))))[0]
    out = tokenize_example(example, tok, "chatml")
    assert tok.decode(out.input_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>"
    assert trained_spans(tok, out) == ["Yo<|im_end|>"]
    # the chat template adds SmolLM2's default system prompt
    assert tok.decode(tokenize_example(example, tok, "chat").input_ids).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_template_that_breaks_the_prefix_property(tok):
    changing = copy.deepcopy(tok)
    # announces the number of turns first, so every earlier rendering differs from the full one
    changing.chat_template = ("turns={{ messages|length }}\n{% for m in messages %}{{ m['role'] }}: "
                              "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    example = parse_examples(jsonl(chat(("user", "Hi", None), ("assistant", "Yo", None))))[0]
    with pytest.raises(DataError, match="line 1: message 2: the chat template renders earlier turns differently"):
        tokenize_example(example, changing, "chat")
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_example(example, bare, "chat")
    assert tokenize_example(example, bare, "chatml") is not None


def test_chat_examples_need_a_conversation_template(tok):
    example = parse_examples(jsonl(chat(("user", "Hi", None), ("assistant", "Yo", None))))[0]
    with pytest.raises(DataError, match="line 1: the 'alpaca' prompt template renders prompt/completion pairs"):
        tokenize_example(example, tok, "alpaca")


@pytest.mark.parametrize("record, prompt", [
    ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "The sum is 4."},
     ALPACA_PROMPT_WITH_INPUT.format(instruction="Add the numbers.", input="2 and 2")),
    ({"instruction": "Say hello.", "output": "Hello!"}, ALPACA_PROMPT.format(instruction="Say hello.")),
])
def test_alpaca_under_alpaca_template(tok, record, prompt):
    out = tokenize_example(parse_examples(json.dumps([record]))[0], tok, "alpaca")
    assert out.input_ids == encode(tok, prompt) + encode(tok, record["output"]) + [tok.eos_token_id]
    assert trained_spans(tok, out) == [record["output"] + tok.eos_token]


@pytest.mark.parametrize("record, user", [
    ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "The sum is 4."}, "Add the numbers.\n\n2 and 2"),
    ({"instruction": "Say hello.", "output": "Hello!"}, "Say hello."),
])
def test_alpaca_under_chat_template(tok, record, user):
    out = tokenize_example(parse_examples(json.dumps([record]))[0], tok, "chat")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(out.input_ids) == text.removesuffix("\n")
    assert trained_spans(tok, out) == [record["output"] + "<|im_end|>"]


def test_prompt_completion_trains_on_completion_and_eos(tok):
    example = parse_examples(jsonl({"prompt": "The capital of France is", "completion": " Paris."}))[0]
    out = tokenize_example(example, tok, "plain")
    prompt, completion = encode(tok, "The capital of France is"), encode(tok, " Paris.")
    assert out.input_ids == prompt + completion + [tok.eos_token_id]
    assert out.labels == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]


def test_text_trains_on_every_token_but_the_first(tok):
    out = tokenize_example(Example(kind="text", text="Once upon a time."), tok, "chat")
    assert out.input_ids == encode(tok, "Once upon a time.") + [tok.eos_token_id]
    assert out.labels == [IGNORE_INDEX] + out.input_ids[1:]  # nothing predicts the first token


def test_truncation_keeps_the_beginning_and_drops_untrainable(tok):
    text = Example(kind="text", text="one two three four five six seven eight")
    full = tokenize_example(text, tok, max_length=100)
    cut = tokenize_example(text, tok, max_length=4)
    assert cut.input_ids == full.input_ids[:4] and cut.labels == full.labels[:4]
    assert tokenize_example(text, tok, max_length=1) is None  # only the unlabelled first token is left

    pair = Example(kind="prompt_completion", prompt="word " * 50, completion="answer")
    assert tokenize_example(pair, tok, "plain", max_length=30) is None
    out = tokenize_example(pair, tok, "plain", max_length=len(encode(tok, "word " * 50)) + 1)
    assert trained_spans(tok, out) == ["answer"]

    (conversation,) = parse_examples(jsonl(CONVERSATION))
    full = tokenize_example(conversation, tok, "chat")
    first_end = full.input_ids.index(tok.convert_tokens_to_ids("<|im_end|>"),
                                     full.labels.index(next(l for l in full.labels if l != IGNORE_INDEX)))
    out = tokenize_example(conversation, tok, "chat", max_length=first_end + 3)
    assert trained_spans(tok, out) == ["Hello there!<|im_end|>"]  # untrained tail after it is cut


# --- packing, split, batches ----------------------------------------------------------------------

def random_examples(n: int, seed: int) -> list[TokenizedExample]:
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.randint(1, 40)
        ids = [rng.randrange(1000) for _ in range(size)]
        prompt = rng.randint(0, size - 1)
        out.append(TokenizedExample(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_packing_keeps_every_token_within_max_length():
    examples = random_examples(200, seed=0)
    packed = pack_examples(examples, max_length=64)
    pieces = []
    for seq in packed:
        assert len(seq.input_ids) <= 64 and sum(seq.seq_lens) == len(seq.input_ids) == len(seq.labels)
        start = 0
        for n in seq.seq_lens:
            pieces.append((tuple(seq.input_ids[start:start + n]), tuple(seq.labels[start:start + n])))
            start += n
    assert Counter(pieces) == Counter((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    total = sum(len(e.input_ids) for e in examples)
    assert len(packed) <= total // 64 + 2  # best-fit decreasing leaves little room unused
    assert count_trained_tokens(packed) == count_trained_tokens(examples)
    assert pack_examples(examples, max_length=64) == packed  # deterministic


def test_packing_best_fit_and_limits():
    sizes = [6, 4, 5, 5]
    examples = [TokenizedExample(input_ids=[1] * n, labels=[1] * n) for n in sizes]
    assert sorted(sorted(s.seq_lens) for s in pack_examples(examples, 10)) == [[4, 6], [5, 5]]
    with pytest.raises(ValueError, match="packing needs"):
        pack_examples(examples, 5)
    assert [s.seq_lens for s in to_sequences(examples)] == [[n] for n in sizes]
    with pytest.raises(ValueError):
        PackedSequence(input_ids=[1, 2], labels=[1, 2], seq_lens=[1])


def test_split_validation_is_deterministic_and_disjoint():
    items = list(range(100))
    train, valid = split_validation(items, fraction=0.1, seed=3)
    assert (train, valid) == split_validation(items, fraction=0.1, seed=3)
    assert len(valid) == 10 and sorted(train + valid) == items and not set(train) & set(valid)
    assert split_validation(items, fraction=0.1, seed=4)[1] != valid
    assert split_validation(["a"]) == (["a"], [])
    assert len(split_validation(["a", "b"])[1]) == 1
    assert len(split_validation(list(range(10_000)), fraction=0.5, max_valid=20)[1]) == 20


def test_iter_batches_deterministic_and_complete():
    seqs = to_sequences(random_examples(23, seed=1))

    def ids(batches):
        return [[seqs.index(s) for s in batch] for batch in batches]
    epoch0 = ids(iter_batches(seqs, batch_size=5, seed=7, epoch=0))
    assert epoch0 == ids(iter_batches(seqs, batch_size=5, seed=7, epoch=0))
    assert [len(b) for b in epoch0] == [5, 5, 5, 5, 3]
    assert sorted(i for b in epoch0 for i in b) == list(range(23))
    epoch1 = ids(iter_batches(seqs, batch_size=5, seed=7, epoch=1))
    assert epoch1 != epoch0 and sorted(i for b in epoch1 for i in b) == list(range(23))
    assert ids(iter_batches(seqs, batch_size=5, seed=8, epoch=0)) != epoch0


def test_load_dataset_stats(tok):
    data = jsonl(chat(("user", "Hi", None), ("assistant", "Hello!", None)),
                 chat(("user", "word " * 200, None), ("assistant", "late", None)),
                 CONVERSATION)
    seqs, stats = load_dataset(data, tok, max_length=128)
    assert (stats.format, stats.num_examples, stats.num_dropped, stats.num_sequences) == ("chat", 3, 1, 2)
    assert stats.num_tokens == sum(len(s.input_ids) for s in seqs)
    assert stats.num_trained_tokens == count_trained_tokens(seqs) > 0
    packed, packed_stats = load_dataset(data, tok, max_length=128, packing=True)
    assert packed_stats.num_sequences == 1 and packed_stats.num_tokens == stats.num_tokens
    with pytest.raises(DataError, match="no example keeps a token"):
        load_dataset(data, tok, max_length=8)
