"""Loader: GGUF round trips (F32 / F16 / Q8_0 / Q4_1, llama.cpp's Q/K permutation), sharded safetensors, errors."""
import json

import gguf
import numpy as np
import pytest
import torch
import transformers

from loraplex.engine.layers.attention import allocate_kv_caches, build_forward_batch
from loraplex.engine.loader import load_model

QTYPES = (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1)


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half layout -> interleaved (GGML rope)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_name(name: str) -> str:
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in table:
        return table[name]
    _, _, i, *rest = name.split(".")
    sub = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{i}.{sub['.'.join(rest[:-1])]}.{rest[-1]}"


def write_gguf(hf_model, path, arch: str) -> None:
    """Write hf_model as llama.cpp would, and set hf_model's weights to what the file holds (after quantization)."""
    cfg = hf_model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // heads)
    writer.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = hf_model.state_dict()
    with torch.no_grad():
        for i, (name, tensor) in enumerate(state.items()):
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # llama.cpp writes no output.weight for tied embeddings
            w = tensor.numpy()
            qtype = None if w.ndim == 1 or "embed" in name else QTYPES[i % 3]
            if qtype is not None:
                # quantization blocks run along rows, so it commutes with llama.cpp's row permutation:
                # the reference weight is simply the round trip in HF layout
                w = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
                tensor.copy_(torch.from_numpy(w))
            if arch == "llama" and ("q_proj" in name or "k_proj" in name):
                w = llamacpp_permute(w, heads if "q_proj" in name else kv_heads)
            data = w if qtype is None else gguf.quants.quantize(w, qtype)
            writer.add_tensor(hf_to_gguf_name(name), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def our_logits(model, config, ids):
    """Prefill in two chunks then decode the rest through the paged cache -> logits [len(ids), vocab]."""
    caches = allocate_kv_caches(config.num_hidden_layers, 64, config.num_key_value_heads, config.head_dim,
                                next(model.parameters()).dtype)
    table, steps, done, out = [7, 2, 12, 5], [6, 5] + [1] * (len(ids) - 11), 0, []
    with torch.no_grad():
        for n in steps:
            batch = build_forward_batch(ids[done:done + n], [n], [done], [table], 4, logits_indices=range(n))
            out.append(model.compute_logits(model(batch, caches)[batch.logits_indices]))
            done += n
    return torch.cat(out)


def tiny_hf_model(arch: str, tie: bool):
    torch.manual_seed(0)
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    config = transformers.LlamaConfig(**kwargs) if arch == "llama" else transformers.Qwen2Config(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_gguf_round_trip_matches_original_weights(tmp_path, arch, tie):
    hf_model = tiny_hf_model(arch, tie)
    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model, path, arch)
    model, config = load_model(path, torch.float32)
    assert config.architecture == ("LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM")
    assert config.tie_word_embeddings == tie and config.rms_norm_eps == 1e-5 and config.eos_token_ids == (2,)
    ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(our_logits(model, config, ids), ref, atol=1e-4, rtol=0)


def test_gguf_unpermute_agrees_with_transformers(tmp_path):
    hf_model = tiny_hf_model("llama", False)
    write_gguf(hf_model, tmp_path / "tiny.gguf", "llama")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                               dtype=torch.float32).state_dict()
    ours, _ = load_model(tmp_path / "tiny.gguf", torch.float32)
    for name, p in ours.state_dict().items():
        torch.testing.assert_close(p, theirs[name], atol=0, rtol=0, msg=name)


def test_sharded_safetensors_and_dtypes(tmp_path):
    hf_model = tiny_hf_model("llama", False)
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, config = load_model(tmp_path, "float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    ids = list(range(5, 21))
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert (our_logits(model, config, ids).float() - ref).abs().max() < 2e-2
    model32, _ = load_model(tmp_path, "auto")  # config.json says float32
    torch.testing.assert_close(our_logits(model32, config, ids), ref, atol=1e-4, rtol=0)


def test_load_errors(tmp_path):
    hf_model = tiny_hf_model("llama", False)
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, "int3")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the checkpoint has only two layers
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks"):
        load_model(tmp_path, "float32")


def test_gguf_hf_config_reads_metadata_only(tmp_path):
    from loraplex.engine.weights import gguf_hf_config

    write_gguf(tiny_hf_model("llama", True), tmp_path / "tiny.gguf", "llama")
    cfg = gguf_hf_config(tmp_path / "tiny.gguf")
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is True and cfg["head_dim"] == 16 and cfg["bos_token_id"] == 1
