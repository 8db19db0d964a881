"""Batch-1 decode speed (and optionally 64 x 64 throughput) side by side with llama.cpp's llama-server, per bit width.

    python scripts/bench/latency_vs_llama_cpp.py --llama-dir /tmp/llama [--formats f32 bf16 8bit 4bit]
        [--rounds 3] [--tokens 128] [--context 1500] [--throughput] [--mixed-adapters] [--cpu-linear stream]

For each format both servers serve the same model (the default one unless --model) on 127.0.0.1 with every core:
    f32   loraplex --dtype float32              llama.cpp F32 GGUF
    bf16  loraplex --dtype bfloat16             llama.cpp BF16 GGUF
    8bit  loraplex GPTQ 8-bit, groups of 64     llama.cpp Q8_0 (8-bit, blocks of 32)
    4bit  loraplex GPTQ 4-bit, groups of 64     llama.cpp Q4_0 (4-bit, blocks of 32)
    (GPTQ with the output head quantized too, `loraplex quantize --lm-head`, as the GGUFs quantize theirs)
(the quantized loraplex models compute in --quant-dtype, float32 by default, with int8 activations per 32 channels
as llama.cpp's; --activation-quant none for exact weight-only products; keys and values in bfloat16 under float32,
as llama.cpp's cache is f16 by default: --kv-cache-dtype auto keeps float32). Rounds alternate which server goes
first; each round times one streamed greedy completion of --tokens tokens per server (decode tok/s = tokens after the
first / time after the first), and loraplex once more with a rank-8 q/v adapter (base and adapter alternating too).
Medians over the rounds are printed as the table in issue 23, with the bandwidth bound measured here (bytes of
weights a step reads / the read bandwidth, measured again every round, both servers idle: this VM's moves between
~35 and ~64 GB/s from minute to minute) and each server's share of it (the median of its rounds' shares, each
against that round's bandwidth). The client is sse_client.py's lean one, the same for both servers. --throughput
adds 64 concurrent streamed chat requests x 64 tokens per server and round (bench_serving's load). --context N
decodes after a prompt of about N tokens (a document of distinct numbered lines, then a request to summarize it)
instead of the short default one: the keys and values a step reads (16-bit in both caches here: llama.cpp's f16, our
bfloat16) then join the weights in the bound, at the context's middle; llama-server gets the context for each of
its 64 slots. --mixed-adapters
then runs the same load on two rank-8 q/v adapters, requests alternating between them: loraplex serves both from
the start (--lora-modules), llama.cpp is restarted with both converted to GGUF LoRA (the peer script's convert-lora;
--lora-init-without-apply) and each request names its set with llama-server's "lora" field (the base rounds ran
without them: a request naming no set would get every adapter at scale 1).

Installs the peer on first use (../shared/peers/llama-cpp.sh install, ~6 min on 2 cores) and caches the GGUFs and
GPTQ folders under --work-dir.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import run_target
from side_by_side import Served
from sse_client import time_per_token, timed_stream

PEER_SCRIPT = Path(__file__).resolve().parents[3] / "shared" / "peers" / "llama-cpp.sh"
PROMPT = ("Rewrite the following paragraph in plain English, keeping every fact: The committee, having considered "
          "the submissions received during the consultation period, resolved to defer its decision on the proposed "
          "amendments until the next scheduled meeting.")
GGUF_TYPE = {"f32": "f32", "bf16": "bf16", "8bit": "q8_0", "4bit": "q4_0"}
PEER_LABEL = {"f32": "F32", "bf16": "BF16", "8bit": "Q8_0", "4bit": "Q4_0"}


def long_prompt(model_dir: str, tokens: int) -> str:
    """About `tokens` tokens (counted with the model's tokenizer): numbered lines that differ in their numbers, so no
    n-gram repeats a line, then a request to summarize them."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines, i = [], 0
    while True:
        lines.append(f"Line {i}: shipment {(i * 7919) % 10007} left depot {i % 13} on day {i % 31} with {i % 97} "
                     f"crates.")
        text = "\n".join(lines) + "\nSummarize the shipments above."
        if len(tokenizer(text)["input_ids"]) >= tokens:
            return text
        i += 1


def kv_bytes_per_step(model_dir: str, context: int) -> int:
    """Keys and values a batch-1 step reads at `context` tokens: 16-bit, every layer."""
    from loraplex.engine.llm_engine import _read_model_config
    c = _read_model_config(model_dir)
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * context


def one_completion(url: str, model: str, tokens: int, prompt: str = PROMPT, extra: dict | None = None) -> float:
    """Decode tokens/s of one streamed greedy completion: tokens after the first over the time after the first,
    read with sse_client.py's lean client (the same for both servers; it shares the two cores with them). The token
    count is the server's usage where it sends one (an event may carry several tokens: `--stream-interval-ms`), the
    events' count otherwise."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **(extra or {})}
    stamps, count = timed_stream(url, "/v1/completions", body)
    if len(stamps) < 2:
        raise RuntimeError(f"{url}: {len(stamps)} streamed chunks")
    return 1.0 / time_per_token(stamps, count)


def ensure_peer(llama_dir: Path) -> None:
    if not (llama_dir / "bin" / "llama-server").exists():
        print(f"installing llama.cpp into {llama_dir} (~6 min)", flush=True)
        subprocess.run(["bash", str(PEER_SCRIPT), "install", str(llama_dir)], check=True)


def gguf(llama_dir: Path, model: str, work: Path, fmt: str) -> Path:
    out = work / f"model-{GGUF_TYPE[fmt]}.gguf"
    if not out.exists():
        print(f"converting {model} to {out.name}", flush=True)
        subprocess.run(["bash", str(PEER_SCRIPT), "convert", str(llama_dir), model, str(out), GGUF_TYPE[fmt]],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def lora_gguf(llama_dir: Path, model: str, peft_dir: Path, work: Path) -> Path:
    """A PEFT adapter as llama.cpp's GGUF LoRA (float32), through the peer script's converter."""
    out = work / f"lora-{Path(model).name}-{peft_dir.name}.gguf"
    if not out.exists():
        subprocess.run(["bash", str(PEER_SCRIPT), "convert-lora", str(llama_dir), model, str(peft_dir), str(out),
                        "f32"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def ours_model(model: str, work: Path, fmt: str) -> tuple[str, list[str]]:
    if fmt in ("f32", "bf16"):
        return model, []
    bits = 8 if fmt == "8bit" else 4
    folder = work / f"gptq-{bits}bit-g64-head"
    if not (folder / "config.json").exists():  # the head quantized too, as llama.cpp's GGUFs have it
        from loraplex.engine.quant.gptq import export_gptq
        export_gptq(model, folder, bits=bits, group_size=64, sym=True, lm_head=True)
    return str(folder), ["--quantization", "gptq"]


def weight_bytes_per_step(model_dir: str, fmt: str) -> int:
    """What a batch-1 step must read: the decoder linears at the format's bits per weight (+ a 2-byte scale per 32
    weights for the quantized ones, as Q8_0 / Q4_0 store), norms, and the output head (tied embedding) at the same
    width. The same figure for both servers: the bound is a property of the format, not of the server."""
    from loraplex.engine.llm_engine import _read_model_config
    c = _read_model_config(model_dir)
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * c.head_dim
    linear = layers * (h * (c.num_attention_heads * c.head_dim) * 2 + h * kv * 2 + 3 * h * inter)
    head = c.vocab_size * h
    per_weight = {"f32": 4.0, "bf16": 2.0, "8bit": 1 + 2 / 32, "4bit": 0.5 + 2 / 32}[fmt]
    return int((linear + head) * per_weight)


def read_bandwidth_gbs() -> float:
    from profile_decode import read_bandwidth_gbs as measure
    return measure()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-dir", required=True, type=Path)
    ap.add_argument("--model", default=None, help="HF-layout folder (default: the default model)")
    ap.add_argument("--formats", nargs="+", default=["f32", "bf16", "8bit", "4bit"], choices=list(GGUF_TYPE))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=None, help="decode after a prompt of about this many tokens")
    ap.add_argument("--quant-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--cpu-linear", default="stream", choices=["auto", "stream", "onednn"])
    ap.add_argument("--activation-quant", default="int8", choices=["int8", "none"])
    ap.add_argument("--kv-cache-dtype", default="bfloat16", choices=["auto", "bfloat16"],
                    help="loraplex's cache under float32 (f32, 8bit, 4bit); bfloat16 as llama.cpp's default f16 cache")
    ap.add_argument("--throughput", action="store_true", help="also 64 concurrent requests x 64 tokens")
    ap.add_argument("--mixed-adapters", action="store_true",
                    help="also 64 x 64 on two rank-8 adapters, requests alternating between them (llama.cpp: the "
                         "adapters converted to GGUF LoRA, each request naming its set), --rounds rounds")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/loraplex-vs-llama-cpp"))
    ap.add_argument("--startup-timeout-s", type=float, default=600)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from loraplex.engine.default_model import ensure_default_model
        model = str(ensure_default_model())
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ensure_peer(args.llama_dir.resolve())
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.llm_engine import _read_model_config
    adapter = write_random_peft(args.work_dir / "adapter", _read_model_config(model), r=8, seed=0, std=0.02)
    adapter1 = write_random_peft(args.work_dir / "adapter1", _read_model_config(model), r=8, seed=1, std=0.02)
    slot_tokens = 256  # llama-server splits -c over its 64 slots
    kv_bytes, prompt = 0, PROMPT
    if args.context:
        if args.kv_cache_dtype != "bfloat16":
            raise SystemExit("--context counts 16-bit caches in the bound: keep --kv-cache-dtype bfloat16")
        prompt = long_prompt(model, args.context)
        slot_tokens = args.context + args.tokens + 64
        kv_bytes = kv_bytes_per_step(model, args.context + args.tokens // 2)
    print(f"model={model} rounds={args.rounds} tokens={args.tokens} context={args.context or 'short prompt'}",
          flush=True)
    rows = []
    for fmt in args.formats:
        peer_gguf = gguf(args.llama_dir.resolve(), model, args.work_dir, fmt)
        ours_dir, ours_flags = ours_model(model, args.work_dir, fmt)
        dtype = fmt if fmt in ("f32", "bf16") else args.quant_dtype
        dtype = {"f32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
        step_bytes = weight_bytes_per_step(model, fmt) + kv_bytes
        servers = []
        try:
            servers.append(Served("loraplex", [
                sys.executable, "-m", "loraplex.serve.cli", "serve", "--model", ours_dir, "--port", "8131",
                "--dtype", dtype, "--served-model-name", "m", "--cpu-linear", args.cpu_linear, *ours_flags,
                "--activation-quant", args.activation_quant, "--kv-cache-dtype", args.kv_cache_dtype,
                "--lora-modules", f"a0={adapter}", f"a1={adapter1}", "--adapter-dir",
                str(args.work_dir / f"store-{fmt}")],
                8131, args.startup_timeout_s))
            servers.append(Served("llama.cpp", ["bash", str(PEER_SCRIPT), "serve", str(args.llama_dir.resolve()),
                                                str(peer_gguf), "8132", "--alias", "m", "-np", "64", "-c",
                                                str(64 * slot_tokens)],
                                  8132, args.startup_timeout_s))
            ours, peer = servers
            speed: dict[str, list[float]] = {"ours": [], "adapter": [], "peer": [], "ours_tp": [], "peer_tp": [],
                                             "bandwidth": []}
            one_completion(ours.url, "m", 8)  # warm-up both
            one_completion(peer.url, "m", 8)
            for i in range(args.rounds):
                # this VM's read bandwidth moves (35 to 64 GB/s within minutes here): measured every round, beside
                # the round's runs (both servers idle), and each round's share taken against its own
                speed["bandwidth"].append(read_bandwidth_gbs())
                order = [("ours", ours), ("peer", peer)]
                for key, server in (order if i % 2 == 0 else order[::-1]):
                    if key == "peer":
                        speed["peer"].append(one_completion(server.url, "m", args.tokens, prompt))
                    else:  # base and adapter, alternating which goes first
                        for model_name, slot in [("m", "ours"), ("a0", "adapter")][::1 if i % 2 == 0 else -1]:
                            speed[slot].append(one_completion(server.url, model_name, args.tokens, prompt))
                    if args.throughput:
                        r = asyncio.run(run_target(server.url, 64, 64, ["m"]))
                        speed[f"{key}_tp"].append(r["tok_s"])
                bound = speed["bandwidth"][-1] * 1e9 / step_bytes
                print(f"{fmt} round {i + 1} (read bandwidth {speed['bandwidth'][-1]:.1f} GB/s, bound {bound:.0f} "
                      f"tok/s): loraplex {speed['ours'][-1]:.1f} tok/s ({speed['ours'][-1] / bound:.0%} of the bound; "
                      f"adapter {speed['adapter'][-1]:.1f}), llama.cpp {speed['peer'][-1]:.1f} tok/s "
                      f"({speed['peer'][-1] / bound:.0%})"
                      + (f"; 64x64 loraplex {speed['ours_tp'][-1]:.0f}, llama.cpp {speed['peer_tp'][-1]:.0f} tok/s"
                         if args.throughput else ""), flush=True)
            if args.mixed_adapters:  # llama.cpp again, with both adapters loaded (its base rounds ran without)
                servers.pop().stop()
                loras = [lora_gguf(args.llama_dir.resolve(), model, a, args.work_dir) for a in (adapter, adapter1)]
                servers.append(Served("llama.cpp", [
                    "bash", str(PEER_SCRIPT), "serve", str(args.llama_dir.resolve()), str(peer_gguf), "8133",
                    "--alias", "m", "-np", "64", "-c", str(64 * slot_tokens), "--lora", ",".join(map(str, loras)),
                    "--lora-init-without-apply"], 8133, args.startup_timeout_s))
                peer = servers[-1]
                # each request names its set; an adapter not named gets scale 0 (peer script's notes)
                peer_models = [("m", {"lora": [{"id": j, "scale": 1.0 if j == k else 0.0} for j in range(2)]})
                               for k in range(2)]
                speed["ours_mix"], speed["peer_mix"] = [], []
                for i in range(args.rounds):
                    order = [("ours", ours, ["a0", "a1"]), ("peer", peer, peer_models)]
                    for key, server, models in (order if i % 2 == 0 else order[::-1]):
                        speed[f"{key}_mix"].append(asyncio.run(run_target(server.url, 64, 64, models))["tok_s"])
                    print(f"{fmt} mixed-adapter round {i + 1}: 64x64 on 2 adapters half/half, loraplex "
                          f"{speed['ours_mix'][-1]:.0f}, llama.cpp {speed['peer_mix'][-1]:.0f} tok/s", flush=True)
        finally:
            for server in servers:
                server.stop()
        med = {k: statistics.median(v) if v else float("nan") for k, v in speed.items()}
        bound = med["bandwidth"] * 1e9 / step_bytes
        shares = {k: statistics.median(t * step_bytes / (b * 1e9) for t, b in zip(speed[k], speed["bandwidth"]))
                  for k in ("ours", "peer")}
        rows.append((fmt, med, bound, shares))
    print("\n| batch-1 decode tok/s | llama.cpp | loraplex | ratio | loraplex + adapter (/ base) | bandwidth bound "
          "(loraplex / llama.cpp share, median of the rounds') | read bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for fmt, med, bound, shares in rows:
        print(f"| {fmt} ({PEER_LABEL[fmt]}) | {med['peer']:.1f} | {med['ours']:.1f} | "
              f"{med['ours'] / med['peer']:.2f}x | {med['adapter']:.1f} ({med['adapter'] / med['ours']:.2f}x) | "
              f"{bound:.0f} "
              f"({shares['ours']:.0%} / {shares['peer']:.0%}) | {med['bandwidth']:.1f} GB/s |")
    if args.throughput or args.mixed_adapters:
        print("\n| 64 x 64 throughput tok/s | llama.cpp | loraplex | ratio |\n|---|---|---|---|")
        for fmt, med, *_ in rows:
            if args.throughput:
                print(f"| {fmt} | {med['peer_tp']:.0f} | {med['ours_tp']:.0f} | "
                      f"{med['ours_tp'] / med['peer_tp']:.2f}x |")
            if args.mixed_adapters:
                print(f"| {fmt}, 2 rank-8 adapters mixed half/half | {med['peer_mix']:.0f} | {med['ours_mix']:.0f} | "
                      f"{med['ours_mix'] / med['peer_mix']:.2f}x |")


if __name__ == "__main__":
    main()
