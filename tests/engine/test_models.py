"""Logits parity with transformers (fp32) for each Llama-family model, through the paged KV cache."""
import random
import types

import pytest
import torch
import transformers

from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.attention import allocate_kv_caches, build_forward_batch
from loraplex.engine.loader import load_model

ATOL = 1e-4
# The 30-layer default model in float32 when our rows run in calls of other sizes than the reference's (mixed
# batches, chunks): the reference's own logits move by up to 1.6e-4 (transformers) and 6.4e-4 (peft, with adapters)
# with the number of rows per call on an AMX Xeon, whose GEMMs are blocked by row count. A real error (a wrong
# scale, position or adapter row) moves them by more than 1e-2.
DEFAULT_MODEL_ATOL = 1e-3

TINY_CONFIGS = {
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5),
    "llama_llama3_rope_tied": lambda: transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "llama_linear_rope_bias": lambda: transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral_sliding_window": lambda: transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=256, sliding_window=6),
    "qwen2_qkv_bias": lambda: transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
}


class PagedRunner:
    """A minimal runner for tests: random non-contiguous blocks, teacher-forced tokens."""

    def __init__(self, model, config, block_size=4, num_blocks=96, seed=0, device="cpu", before_forward=None,
                 cpu_kernel=False):
        self.model, self.config, self.block_size, self.device = model, config, block_size, device
        self.cpu_kernel = cpu_kernel  # the fused CPU attention kernel instead of the plain-torch path
        self.before_forward = before_forward  # (items, starts, batch) -> None, e.g. to set LoRA rows
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        dtype = next(model.parameters()).dtype
        self.kv_caches = allocate_kv_caches(config.num_hidden_layers, num_blocks * block_size,
                                            config.num_key_value_heads, config.head_dim, dtype, device)
        self.num_computed, self.block_tables = {}, {}

    def step(self, seqs, items):
        """items: [(request, num_new_tokens)], decodes (1 token) first -> {request: logits [n, vocab]}."""
        input_ids, query_lens, computed, tables = [], [], [], []
        for name, n in items:
            start = self.num_computed.get(name, 0)
            table = self.block_tables.setdefault(name, [])
            while len(table) * self.block_size < start + n:
                table.append(self.free.pop())
            input_ids += seqs[name][start:start + n]
            query_lens.append(n)
            computed.append(start)
            tables.append(table)
        batch = build_forward_batch(input_ids, query_lens, computed, tables, self.block_size, self.device,
                                    logits_indices=range(len(input_ids)),
                                    sliding_window=self.config.sliding_window, cpu_kernel=self.cpu_kernel)
        if self.before_forward is not None:
            self.before_forward(items, computed, batch)
        with torch.no_grad():
            logits = self.model.compute_logits(self.model(batch, self.kv_caches)[batch.logits_indices],
                                               batch.logits_indices)
        out, row = {}, 0
        for (name, n), c in zip(items, computed):
            out[name] = logits[row:row + n]
            self.num_computed[name] = c + n
            row += n
        return out

    def run(self, seqs, schedule):
        """schedule: list of steps -> {request: logits of all its processed tokens, in order}."""
        outs = {}
        for items in schedule:
            for name, logits in self.step(seqs, items).items():
                outs.setdefault(name, []).append(logits)
        return {name: torch.cat(parts) for name, parts in outs.items()}


def randomize(hf_model):
    """HF initialises biases to 0 and norms to 1; perturb them so the test sees them."""
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.normal_(1, 0.2)


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[request.param]()).eval()
    randomize(hf_model)
    path = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(path)
    model, config = load_model(path, torch.float32)
    return hf_model, model, config


def test_single_prefill_matches_hf(tiny):
    hf_model, model, config = tiny
    ids = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = PagedRunner(model, config).run({"a": ids}, [[("a", 20)]])["a"]
    torch.testing.assert_close(ours, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode_matches_hf(tiny):
    hf_model, model, config = tiny
    ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    schedule = [[("a", 9)], [("a", 7)]] + [[("a", 1)]] * 8
    ours = PagedRunner(model, config).run({"a": ids}, schedule)["a"]
    torch.testing.assert_close(ours, hf_logits(hf_model, ids), atol=ATOL, rtol=0)


def test_mixed_batch_equals_each_alone(tiny):
    hf_model, model, config = tiny
    gen = torch.Generator().manual_seed(3)
    seqs = {"a": torch.randint(0, config.vocab_size, (15,), generator=gen).tolist(),
            "b": torch.randint(0, config.vocab_size, (13,), generator=gen).tolist(),
            "c": torch.randint(0, config.vocab_size, (11,), generator=gen).tolist()}
    # a prefills, then decodes while b prefills in two chunks and c arrives; then all three decode
    mixed = PagedRunner(model, config, seed=4).run(seqs, [
        [("a", 10)],
        [("a", 1), ("b", 5)],
        [("a", 1), ("b", 6), ("c", 9)],
        [("a", 1), ("b", 1), ("c", 1)],
        [("a", 1), ("b", 1), ("c", 1)],
    ])
    for name, n_done in (("a", 14), ("b", 13), ("c", 11)):
        alone = PagedRunner(model, config, seed=5).run(seqs, [[(name, n_done)]])[name]
        torch.testing.assert_close(mixed[name], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[name], hf_logits(hf_model, seqs[name][:n_done]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_hold_exactly_what_is_computed_and_grow(tiny, dtype):
    """The per-position tables a step reads cos/sin from give the same bits as computing them for the step's
    positions, before and after they grow past their first size, in any order and with repeats."""
    rotary = tiny[1].model.rotary_emb
    rotary._tables.clear()
    for positions in ([0, 5, 5, 4095], [17], [4096, 3, 9000], list(range(300)), [20000, 1]):
        p = torch.tensor(positions)
        got, want = rotary(p, dtype), rotary.compute(p, dtype)
        for g, w in zip(got, want):
            assert g.shape == w.shape == (len(positions), 1, rotary.inv_freq.numel() * 2) and g.dtype == dtype
            assert torch.equal(g, w)
    assert rotary._tables[dtype, torch.device("cpu")][0].shape[0] >= 20001
    empty = rotary(torch.tensor([], dtype=torch.int64), dtype)
    assert empty[0].shape == (0, 1, rotary.inv_freq.numel() * 2)
    size = rotary._tables[dtype, torch.device("cpu")][0].shape[0]
    for odd in ([-3, 2], [(1 << 20) + 5]):  # computed, never tabled
        p = torch.tensor(odd)
        assert all(torch.equal(g, w) for g, w in zip(rotary(p, dtype), rotary.compute(p, dtype)))
    assert rotary._tables[dtype, torch.device("cpu")][0].shape[0] == size


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_inputs_in_one_call_are_the_modules_rows(tiny, dtype):
    """LlamaModel.step_inputs gathers the token embeddings and the rotary rows in one kernel call once the tables
    exist: the modules' bits; positions past the tables or below 0 go through the modules (which grow the tables or
    compute), and a token past the vocabulary raises as the embedding does."""
    model = tiny[1].model
    embed, rotary = model.embed_tokens, model.rotary_emb
    model.embed_tokens = torch.nn.Embedding.from_pretrained(embed.weight.detach().to(dtype))
    rotary._tables.clear()
    calls = []
    op = torch.ops.loraplex_cpu.step_inputs

    def counted(*args):
        calls.append(args[4].tolist())
        return op(*args)

    try:
        torch.ops.loraplex_cpu.step_inputs = counted
        for ids, positions in (([1, 2, 3], [0, 5, 5]), ([7, 7], [4095, 3]), ([4], [5000]), ([9, 8], [-3, 2])):
            batch = types.SimpleNamespace(input_ids=torch.tensor(ids), positions=torch.tensor(positions))
            got = model.step_inputs(batch)
            want = (model.embed_tokens(batch.input_ids), *rotary(batch.positions, dtype))
            assert all(g.dtype == dtype and torch.equal(g, w) for g, w in zip(got, want, strict=True))
            assert got[1].shape == (len(ids), 1, rotary.inv_freq.numel() * 2)
        # the first step built the tables (no call), the second and third went through the kernel (the third's
        # position was past the table: it raised, the module grew the table), the fourth's negative position too
        assert calls == [[4095, 3], [5000], [-3, 2]]
        with pytest.raises(IndexError):
            model.step_inputs(types.SimpleNamespace(input_ids=torch.tensor([embed.num_embeddings]),
                                                    positions=torch.tensor([0])))
    finally:
        torch.ops.loraplex_cpu.step_inputs = op
        model.embed_tokens = embed


def test_weights_are_frozen_and_tied(tiny):
    _, model, config = tiny
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == config.tie_word_embeddings
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(model.model.layers[0].self_attn, name), torch.nn.Linear)


def test_bfloat16_load_runs_close_to_float32(tiny, tmp_path):
    hf_model, model32, config = tiny
    hf_model.save_pretrained(tmp_path)
    model16, _ = load_model(tmp_path, "bfloat16")
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert model16.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = list(range(3, 20))
    ref = PagedRunner(model32, config).run({"a": ids}, [[("a", 10)], [("a", 7)]])["a"]
    out = PagedRunner(model16, config).run({"a": ids}, [[("a", 10)], [("a", 7)]])["a"]
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ---------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def smollm2(default_model_dir):  # conftest's session fixture: ensure_default_model()
    path = default_model_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, config = load_model(path, torch.float32)
    return tokenizer, hf_model, model, config


def test_default_model_config(smollm2):
    tokenizer, _, _, config = smollm2
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.eos_token_ids == (2,) and config.torch_dtype == "bfloat16"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_default_model_prompt_matches_hf(smollm2):
    tokenizer, hf_model, model, config = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.").input_ids
    assert 15 <= len(ids) <= 25
    ours = PagedRunner(model, config, block_size=16, num_blocks=16).run({"a": ids}, [[("a", len(ids))]])["a"]
    torch.testing.assert_close(ours, hf_logits(hf_model, ids), atol=ATOL, rtol=0)  # same rows per call as HF


@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["torch-attention", "cpu-kernel-attention"])
def test_default_model_mixed_batch_matches_hf(smollm2, cpu_kernel):
    if cpu_kernel and not cpu_kernels.available():
        pytest.skip("CPU kernels not built (no C++ compiler)")
    tokenizer, hf_model, model, config = smollm2
    seqs = {
        "a": tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=False)
        + tokenizer("The capital of France is Paris.").input_ids,
        "b": tokenizer("Once upon a time, in a small village by the sea, there lived an old fisherman.").input_ids,
    }
    seqs["a"] = list(seqs["a"])
    len_a = len(seqs["a"]) - 5
    runner = PagedRunner(model, config, block_size=16, num_blocks=32, cpu_kernel=cpu_kernel)
    ours = runner.run(seqs, [
        [("a", len_a)],
        [("a", 1), ("b", 8)],  # a decodes while b's prefill starts
        [("a", 1), ("b", len(seqs["b"]) - 8 - 3)],
        [("a", 1), ("b", 1)],
        [("a", 1), ("b", 1)],
        [("a", 1), ("b", 1)],
    ])
    for name in seqs:
        assert ours[name].shape[0] == len(seqs[name])
        torch.testing.assert_close(ours[name], hf_logits(hf_model, seqs[name]), atol=DEFAULT_MODEL_ATOL, rtol=0)
