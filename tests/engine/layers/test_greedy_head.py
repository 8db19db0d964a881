"""The screened greedy head (engine/layers/greedy_head.py, csrc/cpu_greedy_head.cpp): its tokens against the plain
head's argmax (random heads, odd row counts, exact and bfloat16-rounding ties, outlier activations), the bound it rests
on, the exactness of gathered rows it relies on, its fallbacks, and the engine's tokens with it on and off."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.engine_args import EngineArgs
from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.greedy_head import ScreenedGreedyHead, quantize_head
from loraplex.engine.layers.sampler import greedy
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.quant.stream import StreamLinear, dequantize_codes
from tests.engine.test_engine import run_all

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")
DTYPES = [torch.float32, torch.bfloat16]


def dense_head(vocab: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> StreamLinear:
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.05).to(dtype)
    return StreamLinear(hidden, vocab, 32 if dtype == torch.float32 else 16, weight)


def activations(rows: int, hidden: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """Rows like a final norm's output: mostly O(1), a few outlier channels ~20x larger."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen)
    x[:, torch.randperm(hidden, generator=gen)[:3]] *= 20
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 7, 32])
def test_screened_tokens_equal_the_plain_argmax(dtype, rows):
    head = dense_head(4096, 192, dtype)
    screen = ScreenedGreedyHead(head)
    for seed in range(6):
        x = activations(rows, 192, dtype, seed) * (0.1 if seed % 2 else 3.0)  # flat and peaked distributions
        want = greedy(head(x))
        assert torch.equal(screen.greedy(x), want)
        assert torch.equal(screen.reference_greedy(x), want)
    assert screen.num_rows == 6 * rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lowest_index_as_the_plain_argmax(dtype):
    head = dense_head(2048, 128, dtype, seed=3)
    w = head.weight
    w[1500] = w[700]  # an exact tie with a higher index
    w[300] = w[700]  # and one with a lower index
    # near ties: one weight a rounding step apart, logits that round to the same bfloat16 (or differ in float32)
    for i, row in enumerate((1100, 200)):
        w[row] = w[700]
        w[row, i] = torch.nextafter(w[700, i].float(), torch.tensor(1.0)).to(dtype)
    screen = ScreenedGreedyHead(head)  # built after the edits: its copy is of this weight
    # row 0 points at row 700: it and its ties win
    x = torch.cat([w[700:701].float() * 40, activations(3, 128, torch.float32)]).to(dtype)
    want = greedy(head(x))
    assert want[0].item() in (200, 300)
    assert torch.equal(screen.greedy(x), want)
    assert torch.equal(screen.reference_greedy(x), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bound_holds_and_candidates_hold_every_maximum(dtype):
    head = dense_head(4096, 256, dtype, seed=5)
    screen = ScreenedGreedyHead(head)
    x = activations(16, 256, dtype, seed=7)
    exact = head(x).float()  # [16, V]: what the plain path rounds the logits to (x's dtype)
    screened, bound = screen.bounds(x)
    unrounded = x.float() @ head.weight.float().T
    assert bool(((unrounded - screened).abs() <= bound).all())
    rows = set(screen.candidates(x).tolist())
    top = exact.max(-1, keepdim=True).values
    assert {int(v) for v in (exact == top).nonzero()[:, 1]} <= rows  # every tied maximum, each row's
    assert len(rows) < 4096 // 4  # and it does screen


@pytest.mark.parametrize("dtype", DTYPES)
def test_gathered_rows_compute_bit_for_bit_as_in_the_full_head(dtype):
    """What exactness rests on: a vocabulary row's logit from the dense kernel does not depend on the other rows."""
    head = dense_head(1024, 192, dtype, seed=2)
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 3, 8):
        x = activations(rows, 192, dtype, seed=rows)
        full = head(x)
        for n in (1, 5, 17, 64):
            idx = torch.randperm(1024, generator=gen)[:n].sort().values
            part = torch.ops.loraplex_cpu.stream_linear(x, head.weight.index_select(0, idx), None, None, 0, 0, None)
            assert torch.equal(part, full[:, idx])


def test_quantized_copy_and_norms_match_their_definition():
    w = torch.randn(64, 128) * 0.1
    codes, scales, zeros, norms = quantize_head(w)
    deq = dequantize_codes(codes, scales, zeros, 64)
    err = (w - deq).abs().view(64, 2, 64).amax(-1)  # [rows, groups]
    assert bool((err <= scales * 0.5 * (1 + 1e-6)).all())  # round to nearest, never clipped, in every group
    assert bool((zeros == 128).all()) and int(codes.min()) >= 1  # symmetric: codes 1..255 around one zero point
    assert torch.allclose(norms[0], (w - deq).norm(dim=-1)) and torch.allclose(norms[1], deq.norm(dim=-1))


def test_non_finite_rows_and_other_dtypes_fall_back():
    head = dense_head(256, 64, torch.float32)
    screen = ScreenedGreedyHead(head)
    x = activations(2, 64, torch.float32)
    x[1, 5] = float("inf")
    assert screen.greedy(x) is None and screen.reference_greedy(x) is None
    assert screen.greedy(activations(2, 64, torch.float16)) is None
    assert screen.num_rows == 0


def test_heads_it_cannot_screen_are_refused():
    assert not ScreenedGreedyHead.supports(nn.Linear(64, 256))
    with_bias = StreamLinear.from_linear(nn.Linear(64, 256))
    assert not ScreenedGreedyHead.supports(with_bias)
    assert not ScreenedGreedyHead.supports(StreamLinear.from_linear(nn.Linear(48, 256, bias=False)))  # K % 64
    assert not ScreenedGreedyHead.supports(StreamLinear.from_linear(nn.Linear(64, 250, bias=False)))  # V % 16
    with pytest.raises(ValueError, match="greedy head screening"):
        ScreenedGreedyHead(with_bias)


def test_engine_tokens_are_the_same_with_and_without_the_screened_head(default_model_dir):
    """The default model in bfloat16: plain greedy rows (alone and several at once) take the screened head, rows that
    sample, ask for logprobs or bias logits keep the full logits, in the same steps; every token as with it off."""
    engines = {on: LLMEngine.from_engine_args(EngineArgs(
        model=str(default_model_dir), dtype="bfloat16", max_model_len=256, max_num_seqs=8, enable_lora=False,
        num_gpu_blocks_override=128, screened_greedy_head=on)) for on in (True, False)}
    assert engines[False].runner.greedy_head is None
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colours:", "Water boils at"]
    greedy_params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    others = [SamplingParams(max_tokens=12, temperature=0.8, seed=3),
              SamplingParams(max_tokens=12, temperature=0.0, logprobs=2),
              SamplingParams(max_tokens=12, temperature=0.0, logit_bias=((13, 5.0),))]
    out = {}
    for on, eng in engines.items():
        ids = [eng.tokenizer(p)["input_ids"] for p in prompts]
        alone = run_all(eng, {"alone": (ids[0], greedy_params)})
        together = run_all(eng, {f"g{i}": (p, greedy_params) for i, p in enumerate(ids)})
        mixed = run_all(eng, {"g": (ids[0], greedy_params)} | {f"o{i}": (ids[i + 1], p) for i, p in enumerate(others)})
        out[on] = (alone, together, mixed)
        assert alone["alone"] == together["g0"] == mixed["g"]
    assert out[True] == out[False]
    assert engines[True].runner.greedy_head.num_rows >= 16 + 4 * 15  # alone and together went through it


def test_speculative_rows_take_the_screened_head_with_the_same_tokens(default_model_dir):
    """Prompt-lookup drafts: every row of a draft is a greedy row; through the screen they verify to the tokens plain
    greedy decoding without it gives."""
    def engine(**kw):
        return LLMEngine.from_engine_args(EngineArgs(model=str(default_model_dir), dtype="bfloat16", max_model_len=256,
                                                     max_num_seqs=4, enable_lora=False, num_gpu_blocks_override=128,
                                                     **kw))
    spec = engine(speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    plain = engine(screened_greedy_head=False)
    text = "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog."
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    requests = {"a": (spec.tokenizer(text)["input_ids"], params),
                "b": (spec.tokenizer("def add(a, b):")["input_ids"], params)}
    got = run_all(spec, requests)
    assert spec.scheduler.num_accepted_tokens > 0
    assert spec.runner.greedy_head.num_rows > sum(map(len, got.values()))  # the drafts' rows went through it
    assert got == run_all(plain, requests)

