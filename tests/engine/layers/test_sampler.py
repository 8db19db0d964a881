"""Tests for the batched sampler: greedy, penalties, truncation, seeds, min_tokens, logprobs."""
import pytest
import torch

from loraplex.engine.core.request import Request
from loraplex.engine.core.sampling_params import SamplingParams
from loraplex.engine.layers.sampler import Sampler, SamplingMetadata, apply_penalties


def make_request(prompt=(1, 2, 3), output=(), eos=(), **params) -> Request:
    params.setdefault("max_tokens", 64)
    req = Request("r", list(prompt), SamplingParams(**params), eos_token_ids=eos)
    req.output_token_ids = list(output)
    return req


def sample(logits, requests):
    md = SamplingMetadata.build(requests, logits.shape[1], logits.device)
    return Sampler()(logits, md)


def test_greedy_is_argmax_and_leaves_input_untouched():
    torch.manual_seed(0)
    logits = torch.randn(5, 97)
    before = logits.clone()
    out = sample(logits, [make_request(temperature=0.0) for _ in range(5)])
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=1))
    assert out.logprobs is None and out.logprob_token_ids is None
    assert torch.equal(logits, before)


def test_temperature_zero_and_top_k_one_are_greedy_in_a_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    reqs = [make_request(temperature=0.0), make_request(temperature=1.5),
            make_request(top_k=1, temperature=2.0), make_request(temperature=1.0, seed=3)]
    md = SamplingMetadata.build(reqs, 50, "cpu")
    assert md.is_greedy.tolist() == [True, False, True, False]
    assert not md.all_greedy and not md.all_random
    ids = Sampler()(logits, md).sampled_token_ids
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()


def test_repetition_penalty_matches_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(2)
    vocab = 40
    logits = torch.randn(2, vocab) * 3
    reqs = [make_request(prompt=[1, 5, 7, 5], output=[9, 30], repetition_penalty=1.3),
            make_request(prompt=[2, 3], output=[], repetition_penalty=0.8)]
    md = SamplingMetadata.build(reqs, vocab, "cpu")
    got = apply_penalties(logits.clone(), md)
    for row, req in enumerate(reqs):
        proc = RepetitionPenaltyLogitsProcessor(req.sampling_params.repetition_penalty)
        want = proc(torch.tensor([req.all_token_ids]), logits[row:row + 1].clone())[0]
        torch.testing.assert_close(got[row], want)


def test_presence_and_frequency_penalties_hand_computed():
    logits = torch.zeros(2, 6)
    reqs = [make_request(prompt=[0, 1], output=[2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25),
            make_request(prompt=[4], output=[4])]  # no penalties on this row
    md = SamplingMetadata.build(reqs, 6, "cpu")
    got = apply_penalties(logits, md)
    # prompt tokens 0, 1 are not penalised; token 2 seen twice, token 3 once
    assert got[0].tolist() == [0.0, 0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0.0, 0.0]
    assert got[1].tolist() == [0.0] * 6


def test_greedy_takes_argmax_of_penalised_logits():
    logits = torch.tensor([[5.0, 4.0, 1.0, -3.0]])
    req = make_request(prompt=[0], output=[0], temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, [req]).sampled_token_ids.item() == 1  # 5/2 < 4


def test_penalties_skipped_when_unused():
    md = SamplingMetadata.build([make_request(), make_request(temperature=0.0)], 10, "cpu")
    assert md.no_penalties and md.prompt_token_ids is None and md.output_token_ids is None


def _draws(logits_row, n, **params):
    logits = logits_row.expand(n, -1).contiguous()
    return sample(logits, [make_request(**params) for _ in range(n)]).sampled_token_ids


LOGITS = torch.log(torch.tensor([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02]))


def test_unrestricted_sampling_follows_the_distribution():
    torch.manual_seed(3)
    counts = torch.bincount(_draws(LOGITS, 20000), minlength=8).float() / 20000
    torch.testing.assert_close(counts, LOGITS.exp(), atol=0.015, rtol=0)


def test_top_k_never_samples_masked_tokens():
    torch.manual_seed(4)
    ids = _draws(LOGITS, 4000, top_k=3)
    assert set(ids.tolist()) == {0, 1, 2}


def test_top_p_never_samples_masked_tokens():
    torch.manual_seed(5)
    # cumulative: 0.30, 0.55, 0.70 -> top_p=0.6 keeps {0, 1, 2}
    assert set(_draws(LOGITS, 4000, top_p=0.6).tolist()) == {0, 1, 2}
    # after top-k=2 the kept mass is renormalised: 0.30/0.55 = 0.545 >= 0.5 keeps only token 0
    assert set(_draws(LOGITS, 500, top_k=2, top_p=0.5).tolist()) == {0}


def test_min_p_never_samples_masked_tokens():
    torch.manual_seed(6)
    # threshold 0.5 * 0.30 = 0.15 keeps {0, 1, 2}
    assert set(_draws(LOGITS, 4000, min_p=0.5).tolist()) == {0, 1, 2}


def test_mixed_truncation_rows_stay_independent():
    torch.manual_seed(7)
    reqs = [make_request(top_k=2), make_request(), make_request(min_p=0.8), make_request(top_p=0.25)]
    n = 1000
    logits = LOGITS.expand(4 * n, -1).contiguous()
    ids = sample(logits, reqs * n).sampled_token_ids.view(n, 4)
    assert set(ids[:, 0].tolist()) == {0, 1}
    assert len(set(ids[:, 1].tolist())) == 8
    assert set(ids[:, 2].tolist()) == {0, 1}  # threshold 0.8 * 0.30 = 0.24
    assert set(ids[:, 3].tolist()) == {0}


def test_seeded_row_reproducible_alone_and_in_a_batch():
    vocab = 64
    seeded = dict(temperature=1.0, seed=1234)
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(vocab, generator=gen) * 0.1 for _ in range(12)]  # nearly uniform
    alone, in_batch = [], []
    for step, row_logits in enumerate(steps):
        req = make_request(output=list(range(step)), **seeded)
        alone.append(sample(row_logits[None].clone(), [req]).sampled_token_ids.item())
        others = [make_request(), make_request(seed=99), make_request(temperature=0.0), make_request(top_p=0.9)]
        batch = others[:2] + [req] + others[2:]
        logits = torch.randn(5, vocab)
        logits[2] = row_logits
        in_batch.append(sample(logits, batch).sampled_token_ids[2].item())
    assert alone == in_batch
    assert len(set(alone)) > 3  # fresh noise every step, not the same draw repeated
    # replaying a step (as after preemption and recompute) gives the same token
    req = make_request(output=list(range(5)), **seeded)
    assert sample(steps[5][None].clone(), [req]).sampled_token_ids.item() == alone[5]


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    ids = {sample(logits, [make_request(seed=s)]).sampled_token_ids.item() for s in range(8)}
    assert len(ids) > 1


def test_min_tokens_blocks_eos_and_stop_token_ids():
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]] * 4)
    reqs = [make_request(eos=(1,), stop_token_ids=(2,), min_tokens=2, temperature=0.0),
            make_request(eos=(1,), stop_token_ids=(2,), min_tokens=2, temperature=0.0, output=[4, 4]),
            make_request(eos=(1,), min_tokens=2, temperature=0.0, ignore_eos=True),
            make_request(eos=(1, 99), stop_token_ids=(2,), min_tokens=3, top_k=2, output=[4])]
    ids = sample(logits, reqs).sampled_token_ids.tolist()
    assert ids[:3] == [3, 1, 1]
    assert ids[3] in (0, 3, 4)  # top-k over what is left: never eos or a stop token


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(8)
    logits = torch.randn(3, 30)
    reqs = [make_request(logprobs=3, temperature=0.7, repetition_penalty=1.5, output=[4]),
            make_request(logprobs=0, temperature=0.0),
            make_request(top_k=5)]
    out = sample(logits, reqs)
    assert out.logprob_token_ids.shape == (3, 4) and out.logprobs.shape == (3, 4)
    raw = logits.log_softmax(dim=1)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.logprob_token_ids))
    top = raw.topk(3, dim=1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices)


def test_logprobs_zero_gives_only_the_sampled_column():
    out = sample(torch.randn(2, 10), [make_request(logprobs=0), make_request()])
    assert out.logprobs.shape == (2, 1)


def test_bf16_logits():
    torch.manual_seed(9)
    logits = torch.randn(4, 128).to(torch.bfloat16)
    reqs = [make_request(temperature=0.0), make_request(top_p=0.8, logprobs=2),
            make_request(seed=5, min_p=0.1), make_request(temperature=0.0, presence_penalty=1.0, output=[3])]
    out = sample(logits, reqs)
    assert out.sampled_token_ids[0] == logits[0].float().argmax()
    assert out.logprobs.dtype == torch.float32
    assert ((out.sampled_token_ids >= 0) & (out.sampled_token_ids < 128)).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_matches_cpu_and_seeded_rows_reproduce():
    torch.manual_seed(10)
    logits = torch.randn(6, 1000)
    reqs = [make_request(temperature=0.0, repetition_penalty=1.2, output=[5]), make_request(top_k=50),
            make_request(seed=7, top_p=0.9), make_request(min_p=0.05, logprobs=5),
            make_request(temperature=0.0, min_tokens=1, eos=(int(logits[4].argmax()),)), make_request(seed=8)]
    cpu = sample(logits, reqs)
    gpu = sample(logits.cuda(), reqs)
    assert gpu.sampled_token_ids.is_cuda
    assert gpu.sampled_token_ids[[0, 4]].tolist() == cpu.sampled_token_ids[[0, 4]].tolist()
    torch.testing.assert_close(gpu.logprobs[:, 1:].cpu(), cpu.logprobs[:, 1:])
    alone = sample(logits[2:3].cuda(), [reqs[2]]).sampled_token_ids.item()
    shuffled = sample(logits[[5, 2]].cuda(), [reqs[5], reqs[2]]).sampled_token_ids[1].item()
    assert alone == shuffled == gpu.sampled_token_ids[2].item()


def test_logit_bias_bans_and_forces_tokens_per_row():
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0, 1.0]] * 4)
    reqs = [make_request(temperature=0.0, logit_bias=((1, -100.0),)),  # ban the argmax: the runner-up wins
            make_request(temperature=0.0, logit_bias=((4, 100.0),)),  # force a token
            make_request(temperature=0.0),  # no bias: the row beside is untouched
            make_request(temperature=0.9, seed=3, logit_bias=((0, 100.0), (1, -100.0)))]  # random rows too
    out = sample(logits.clone(), reqs)
    assert out.sampled_token_ids.tolist() == [2, 4, 1, 0]
    with_lp = sample(logits[:1].clone(), [make_request(temperature=0.0, logprobs=1, logit_bias=((4, 100.0),))])
    assert with_lp.sampled_token_ids.tolist() == [4]
    raw = torch.log_softmax(logits[0], dim=0)
    assert with_lp.logprobs[0, 0].item() == pytest.approx(raw[4].item())  # logprobs stay those of the model


@pytest.mark.parametrize("bias", [((1, 100.5),), ((-1, 1.0),), ((2, 1.0), (2, -1.0)), tuple((i, 1.0) for i in range(301))])
def test_bad_logit_bias(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_bad_words_ban_single_tokens_and_the_end_of_sequences():
    from loraplex.engine.layers.sampler import banned_next_tokens
    words = ((3,), (1, 2), (4, 1, 2))
    assert banned_next_tokens(words, []) == [3]
    assert banned_next_tokens(words, [0, 1]) == [2, 3]  # "1 2" would be completed by 2
    assert banned_next_tokens(words, [4, 1]) == [2, 3]
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 2.0]] * 2)
    reqs = [make_request(temperature=0.0, output=[1], bad_words_token_ids=words),  # 2 and 3 banned: 4 wins
            make_request(temperature=0.0, output=[0], bad_words_token_ids=words)]  # only 3 banned: 2 wins
    assert sample(logits, reqs).sampled_token_ids.tolist() == [4, 2]


@pytest.mark.parametrize("params", [
    {"temperature": 0.0}, {"top_k": 1, "temperature": 0.7}, {"temperature": 0.8}, {"temperature": 0.0, "logprobs": 0},
    {"temperature": 0.0, "repetition_penalty": 1.2}, {"temperature": 0.0, "logit_bias": ((3, 5.0),)},
    {"temperature": 0.0, "min_tokens": 4}, {"temperature": 0.0, "bad_words_token_ids": ((5,),)},
])
def test_sample_skips_the_metadata_only_where_the_sampler_takes_its_argmax_shortcut(params, monkeypatch):
    """Sampler.sample skips building metadata for rows SamplingMetadata.plain_greedy accepts and takes the argmax
    itself: that must be only where the sampler, given the metadata, would return the plain argmax too, and the
    result must be what it returns."""
    torch.manual_seed(9)
    logits = torch.randn(2, 50)
    reqs = [make_request(temperature=0.0, eos=(7,)), make_request(eos=(7,), **params)]
    md = SamplingMetadata.build(reqs, 50, "cpu")
    sampler_plain = (md.all_greedy and md.no_penalties and md.suppress_rows is None and md.bias_rows is None
                     and md.token_bitmask is None and md.max_num_logprobs is None)
    assert SamplingMetadata.plain_greedy(reqs) == sampler_plain
    assert SamplingMetadata.plain_greedy(reqs) == (params in ({"temperature": 0.0}, {"top_k": 1, "temperature": 0.7}))
    assert not SamplingMetadata.plain_greedy(reqs[:1], torch.zeros(1, 2, dtype=torch.int32))
    if sampler_plain:
        assert torch.equal(Sampler()(logits, md).sampled_token_ids, logits.argmax(dim=1))
    built = []
    monkeypatch.setattr(SamplingMetadata, "build", lambda *a, _b=SamplingMetadata.build: built.append(1) or _b(*a))
    out = Sampler().sample(logits, reqs, "cpu")
    assert bool(built) != sampler_plain
    assert out.sampled_token_ids[0] == logits[0].argmax()  # the plain greedy row: its argmax either way
