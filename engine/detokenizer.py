"""Incremental detokenization and stop strings (vLLM/TGI `detokenize_incrementally` offsets)."""
from __future__ import annotations

import functools

from loraplex.engine.core.sampling_params import SamplingParams

# prompt tokens decoded as context before the first output token (SentencePiece leading spaces)
INITIAL_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


@functools.lru_cache(maxsize=1 << 18)
def decode_token_text(tokenizer, token_id: int) -> str:
    """The token's own text, as shown in logprobs (a leading-space marker becomes a space)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token is None:
        return ""
    text = tokenizer.convert_tokens_to_string([token])
    # SentencePiece decoders strip the leading space of a sequence; a lone token keeps it
    if token.startswith("\u2581") and not text.startswith(" "):
        text = " " + text
    return text


class IncrementalDetokenizer:
    """Turns a request's output token ids into text deltas. Each step decodes only a small window
    of ids: `prefix_offset..read_offset` is text already produced (decoded again as context so
    leading spaces and merged bytes come out right), `read_offset..` is new. Text ending in U+FFFD
    (half a UTF-8 character) is held back until the next token completes it.

    With stop strings excluded from the output, the last `max_stop_len - 1` characters are also
    held back until known not to begin a stop string. All per-token work is O(window): the text
    already streamed is only appended to, and stop strings are searched in the tail alone."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.stop_buffer_len = 0 if self.include_stop_str_in_output else max(self.max_stop_len - 1, 0)
        # a little more context than needed, in case some prompt tokens are special and skipped
        self.token_ids: list[int] = list(prompt_token_ids[-(INITIAL_CONTEXT_TOKENS + 2):])
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(self.read_offset - INITIAL_CONTEXT_TOKENS, 0)
        self.stopped = False
        self.stop_reason: str | None = None
        self._emitted: list[str] = []  # streamed text, in pieces
        self._pending = ""  # decoded, not yet streamed
        self._tail = ""  # last max_stop_len - 1 chars decoded: where a stop string may begin
        self._text_len = 0  # chars decoded so far (after any stop cut)

    @property
    def output_text(self) -> str:
        """All text decoded so far, streamed or held back; cut at the stop string once matched."""
        return "".join(self._emitted) + self._pending

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_new(self, allow_partial: bool) -> str:
        """Text of the ids past read_offset; "" (offsets unchanged) while it would end mid-character."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not allow_partial):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text):]

    def update(self, new_token_ids: list[int]) -> str:
        """Append sampled tokens; return the new text that is safe to stream."""
        if self.stopped:
            return ""
        new_text = ""
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            new_text += self._decode_new(allow_partial=False)
        if new_text:
            self._append(new_text)
        return self._emit(final=self.stopped)

    def flush(self) -> str:
        """The request finished for another reason: emit everything held back."""
        if not self.stopped:
            rest = self._decode_new(allow_partial=True)
            if rest:
                self._append(rest)
        return self._emit(final=True)

    def _append(self, new_text: str) -> None:
        window = self._tail + new_text  # a match must end in new_text, so it begins in this window
        window_start = self._text_len - len(self._tail)
        self._pending += new_text
        self._text_len += len(new_text)
        if self.max_stop_len > 1:
            self._tail = window[-(self.max_stop_len - 1):]
        match: tuple[int, str] | None = None
        for stop in self.stop:
            idx = window.find(stop)
            if idx != -1 and (match is None or idx < match[0]):
                match = (idx, stop)
        if match is None:
            return
        idx, stop = match
        cut = window_start + idx + (len(stop) if self.include_stop_str_in_output else 0)
        # the cut never falls in streamed text: the held-back buffer covers a stop string's start
        self._pending = self._pending[:cut - (self._text_len - len(self._pending))]
        self._text_len = cut
        self.stopped, self.stop_reason = True, stop

    def _emit(self, final: bool) -> str:
        num_chars = len(self._pending) if final else len(self._pending) - self.stop_buffer_len
        if num_chars <= 0:
            return ""
        delta, self._pending = self._pending[:num_chars], self._pending[num_chars:]
        self._emitted.append(delta)
        return delta
