"""A stand-in for AsyncEngine with the same surface: deterministic tokens, a byte-level tokenizer built
in-process (no hub), and a record of every request added and aborted."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loraplex.engine.async_engine import RequestStream
from loraplex.engine.core.config import ModelConfig
from loraplex.engine.core.errors import EngineDeadError, PromptTooLongError
from loraplex.engine.core.outputs import EngineStats, RequestOutput, TokenLogprob
from loraplex.engine.core.sampling_params import SamplingParams

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT_REPLY = "Hello! I am a fake model."
MODEL_NAME = "fake-model"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256 ids) plus ChatML's special tokens; any text round-trips."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE)


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class FakeEngine:
    def __init__(self, reply: str = DEFAULT_REPLY, *, max_model_len: int = 512,
                 token_delay_s: float = 0.0, endless: bool = False) -> None:
        self.tokenizer = build_tokenizer()
        self.eos_token_id = self.tokenizer.eos_token_id
        self.model_config = ModelConfig(
            architecture="LlamaForCausalLM", vocab_size=len(self.tokenizer), hidden_size=8,
            intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            head_dim=4, max_position_embeddings=max_model_len, eos_token_ids=(self.eos_token_id,))
        self.max_model_len = max_model_len
        self.reply_ids = self.tokenizer.encode(reply, add_special_tokens=False)
        self.token_delay_s = token_delay_s
        self.endless = endless  # never emit EOS: generate until max_tokens or abort
        self.add_error: Exception | None = None  # raised by the next add_request calls
        self.fail_after_tokens: int | None = None  # then the stream raises EngineDeadError
        self.healthy = True
        self.started = False
        self.requests: dict[str, FakeRequest] = {}
        self.aborted: list[str] = []
        self.calls: list[tuple] = []  # control calls as (method, *args), e.g. ("train_submit", job_id)
        self.call_error: Exception | None = None  # raised by the next control calls
        self._tasks: dict[str, asyncio.Task] = {}

    @classmethod
    def from_engine_args(cls, args, in_process: bool = False, hook_factory=None,
                         background_factory=None) -> "FakeEngine":
        engine = cls()
        engine.engine_args = args
        engine.hook_factory = hook_factory
        engine.background_factory = background_factory
        return engine

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.started = False
        for task in self._tasks.values():
            task.cancel()

    @property
    def is_healthy(self) -> bool:
        return self.healthy

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self._tasks), num_waiting=0, num_free_blocks=90, num_total_blocks=100,
                           spec_draft_tokens=12, spec_accepted_tokens=9)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        if self.add_error is not None:
            raise self.add_error
        if not self.started:
            raise EngineDeadError("the fake engine is not running")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(prompt_token_ids), params.max_tokens, self.max_model_len)
        assert request_id not in self.requests, "request ids must be unique"
        self.requests[request_id] = FakeRequest(request_id, list(prompt_token_ids), params)
        stream = RequestStream(request_id)
        task = asyncio.get_running_loop().create_task(self._generate(request_id, stream))
        self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request_id, None))
        return stream

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    async def call(self, method: str, *args):
        self.calls.append((method, *args))
        if self.call_error is not None:
            raise self.call_error
        return None

    def _logprob(self, token_id: int, k: int) -> TokenLogprob:
        alternatives = [t for t in range(64, 64 + k + 1) if t != token_id][:max(0, k - 1)]
        top = [(token_id, self._text(token_id), -0.5)] + [
            (t, self._text(t), -1.0 - i) for i, t in enumerate(alternatives)]
        return TokenLogprob(token_id, self._text(token_id), -0.5, top[:k])

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def _generate(self, request_id: str, stream: RequestStream) -> None:
        req = self.requests[request_id]
        params, reply = req.params, self.reply_ids
        text, num_emitted = "", 0  # text held back while it could still start a stop string
        hold = max((len(stop) - 1 for stop in params.stop), default=0)
        for step in range(params.max_tokens):
            await asyncio.sleep(self.token_delay_s)
            if step == self.fail_after_tokens:
                self.healthy = False
                stream.put(EngineDeadError("the fake engine loop died"))
                return
            if step < len(reply) or self.endless or params.ignore_eos:
                token_id = reply[step % len(reply)]
            else:
                token_id = self.eos_token_id
            finish_reason = stop_reason = None
            if token_id == self.eos_token_id:
                finish_reason = "stop"
            else:
                text += self._text(token_id)
            end = len(text) - hold
            for stop in params.stop:
                if stop in text:
                    end = text.index(stop) + (len(stop) if params.include_stop_str_in_output else 0)
                    finish_reason, stop_reason = "stop", stop
                    break
            if finish_reason is None and step == params.max_tokens - 1:
                finish_reason = "length"
            if finish_reason is not None and stop_reason is None:
                end = len(text)
            delta, num_emitted = text[num_emitted:max(end, num_emitted)], max(end, num_emitted)
            logprobs = None if params.logprobs is None else [self._logprob(token_id, params.logprobs)]
            stream.put(RequestOutput(
                request_id=request_id, text=delta, token_ids=[token_id], finished=finish_reason is not None,
                num_prompt_tokens=len(req.prompt_token_ids), num_output_tokens=step + 1, logprobs=logprobs,
                finish_reason=finish_reason, stop_reason=stop_reason))
            if finish_reason is not None:
                return
