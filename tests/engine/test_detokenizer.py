"""Tests for incremental detokenization and stop strings, on tiny tokenizers trained in the test."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.detokenizer import IncrementalDetokenizer, decode_token_text

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文文本。",
    "emoji party 😀🎉 with friends 👍🏽 and 🐍 snakes",
    "Stop here. The answer is 42! END of text.",
] * 3
TEXTS = [
    "Hello world, the quick brown fox.",
    "日本語のテキスト 😀🎉 mixed with words",
    "snakes 🐍🐍 and thumbs 👍🏽👍🏽 ✨ unseen ∑∫ ünïcödé",
    "END END. The answer is 42!",
]


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE (GPT-2 style) with a vocabulary small enough to split emoji and CJK bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<eos>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                   additional_special_tokens=["<|im_start|>"])


@pytest.fixture(scope="module")
def sentencepiece_like():
    """Metaspace BPE (Llama/SentencePiece style): the decoder drops the sequence's leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def stream(detok, ids, chunk=1):
    deltas = [detok.update(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas, detok.flush()


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_rebuild_the_decoded_text(bpe, text, chunk):
    ids = bpe.encode(text)
    prompt = bpe.encode("<|im_start|>user: hi 😀")
    detok = IncrementalDetokenizer(bpe, prompt, SamplingParams())
    deltas, rest = stream(detok, ids, chunk)
    full = bpe.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) + rest == full == text
    assert detok.output_text == full
    assert not any("\ufffd" in d for d in deltas)
    assert not detok.stopped and detok.stop_reason is None


def test_half_characters_are_held_back(bpe):
    ids = bpe.encode("🐍🐍 ∑")
    assert "\ufffd" in bpe.decode(ids[:1])  # the tokenizer really splits the emoji's bytes
    detok = IncrementalDetokenizer(bpe, [5], SamplingParams())
    emitted = ""
    for i, token_id in enumerate(ids):
        emitted += detok.update([token_id])
        assert bpe.decode(ids[:i + 1]).startswith(emitted)
        assert "\ufffd" not in emitted
    assert emitted + detok.flush() == "🐍🐍 ∑"


def test_flush_emits_a_trailing_half_character(bpe):
    ids = bpe.encode("ok 🐍")
    cut = next(i for i in range(1, len(ids)) if bpe.decode(ids[:i]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(bpe, [5], SamplingParams())
    deltas, rest = stream(detok, ids[:cut])
    assert "".join(deltas) + rest == bpe.decode(ids[:cut])
    assert rest.endswith("\ufffd")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(bpe, skip):
    ids = bpe.encode("Hello world") + [bpe.eos_token_id] + bpe.encode(" fox")
    detok = IncrementalDetokenizer(bpe, [5], SamplingParams(skip_special_tokens=skip))
    deltas, rest = stream(detok, ids)
    assert "".join(deltas) + rest == bpe.decode(ids, skip_special_tokens=skip)
    assert ("<eos>" in detok.output_text) is not skip


def test_sentencepiece_leading_space_uses_prompt_context(sentencepiece_like):
    tok = sentencepiece_like
    prompt, completion = tok.encode("the quick"), tok.encode(" brown fox jumps")
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams())
    deltas, rest = stream(detok, completion)
    whole, head = tok.decode(prompt + completion), tok.decode(prompt)
    assert "".join(deltas) + rest == whole[len(head):] == " brown fox jumps"


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text,stop,before", [
    ("Hello world, the quick brown fox.", "o w", "Hell"),  # spans three tokens
    ("Hello world, the quick brown fox.", "ui", "Hello world, the q"),  # inside one token
    ("日本語のテキスト 😀🎉 mixed", "😀🎉", "日本語のテキスト "),
    ("END END. The answer is 42!", "42", "END END. The answer is "),
])
def test_stop_string_cuts_output(bpe, text, stop, before, include):
    ids = bpe.encode(text)
    params = SamplingParams(stop=("never matches", stop), include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(bpe, [5], params)
    emitted, stopped_at = "", None
    for i, token_id in enumerate(ids):
        emitted += detok.update([token_id])
        if detok.stopped and stopped_at is None:
            stopped_at = i
    want = before + stop if include else before
    assert detok.stopped and detok.stop_reason == stop
    assert emitted == detok.output_text == want
    assert detok.flush() == "" and detok.update(ids[:2]) == ""
    # stopped at the first token whose text completes the stop string
    assert stop in bpe.decode(ids[:stopped_at + 1]) and stop not in bpe.decode(ids[:stopped_at])


def test_streamed_text_never_holds_a_stop_prefix(bpe):
    text, stop = "The answer is 42! END of text.", "! END"
    ids = bpe.encode(text)
    detok = IncrementalDetokenizer(bpe, [5], SamplingParams(stop=(stop,)))
    emitted = ""
    for token_id in ids:
        emitted += detok.update([token_id])
        assert "!" not in emitted  # "!" only ever appears as the start of the stop string
    assert emitted == "The answer is 42"


def test_earliest_stop_string_wins(bpe):
    ids = bpe.encode("Hello world, the quick brown fox.")
    detok = IncrementalDetokenizer(bpe, [5], SamplingParams(stop=("brown", "the", "fox")))
    deltas, rest = stream(detok, ids, chunk=len(ids))  # all at once, as after speculative decoding
    assert "".join(deltas) + rest == "Hello world, " and detok.stop_reason == "the"


def test_unmatched_stop_buffer_is_flushed(bpe):
    text = "Hello world, the quick brown fox."
    detok = IncrementalDetokenizer(bpe, [5], SamplingParams(stop=("xyzzy",)))
    deltas, rest = stream(detok, bpe.encode(text))
    assert "".join(deltas) == text[:-4] and rest == text[-4:]
    assert not detok.stopped


def test_include_stop_str_streams_without_holding_back(bpe):
    text = "Hello world, the quick brown fox."
    detok = IncrementalDetokenizer(bpe, [5], SamplingParams(stop=("xyzzy",), include_stop_str_in_output=True))
    deltas, rest = stream(detok, bpe.encode(text))
    assert "".join(deltas) == text and rest == ""


def test_work_per_token_is_bounded(bpe):
    calls = []
    decode = bpe.decode

    class Spy:
        def __getattr__(self, name):
            return getattr(bpe, name)

        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return decode(ids, **kwargs)

    ids = bpe.encode(" ".join(TEXTS)) * 20
    detok = IncrementalDetokenizer(Spy(), bpe.encode("a long prompt " * 50), SamplingParams(stop=("zz",)))
    deltas, rest = stream(detok, ids)
    assert "".join(deltas) + rest == bpe.decode(ids)
    assert len(ids) > 500 and max(calls) <= 16


def test_decode_token_text(bpe, sentencepiece_like):
    (world,) = [t for t in bpe.encode(" world") if bpe.convert_ids_to_tokens(t).startswith("Ġ")]
    assert decode_token_text(bpe, world).startswith(" ")
    assert decode_token_text(bpe, bpe.eos_token_id) == "<eos>"
    sp_ids = sentencepiece_like.encode("the quick")
    assert "".join(decode_token_text(sentencepiece_like, t) for t in sp_ids) == " the quick"
