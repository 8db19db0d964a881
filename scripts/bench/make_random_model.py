"""A randomly initialised Llama folder of a chosen shape with the default model's tokenizer: for speed measurements
on a larger model than the default one (the weights' values do not change how fast a step runs; its text is noise).

    python scripts/bench/make_random_model.py --output /tmp/big/random-680m [--hidden 1536] [--layers 24]
        [--heads 24] [--kv-heads 8] [--intermediate 4096] [--dtype bfloat16] [--seed 0]

The defaults give 680M parameters (a 0.7B-class shape; the head tied to the embedding, the default model's 49152
vocabulary). `latency_vs_llama_cpp.py --model <folder> --work-dir <another folder>` then compares both servers on it.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplex.engine.default_model import ensure_default_model

    src = ensure_default_model()
    base = json.loads((src / "config.json").read_text())
    config = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=base.get("bos_token_id"),
                         eos_token_id=base.get("eos_token_id"), torch_dtype=args.dtype)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, safe_serialization=True)
    for f in src.iterdir():  # the tokenizer and generation defaults
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json",
                                                        "vocab.json", "merges.txt"):
            shutil.copy(f, args.output / f.name)
    print(f"{args.output}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ({args.dtype})")


if __name__ == "__main__":
    main()
