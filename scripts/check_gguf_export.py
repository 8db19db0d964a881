"""Does llama.cpp load what `loraplex export` writes, and compute what loraplex serves?

    bash ../shared/peers/llama-cpp.sh install ~/llama-cpp      # once (~6 min on 2 cores)
    python scripts/check_gguf_export.py ~/llama-cpp [--adapter PEFT_DIR]

With the default model and an adapter (default: a random rank-8 all-linear one, large enough to change the
answers), it writes (1) the merged model as an f32 GGUF and (2) the adapter as a GGUF LoRA, converts the base
with llama.cpp's own convert_hf_to_gguf.py for (2), then asks llama-server for greedy completions of a few
prompts with each, and loraplex (float32, the adapter served) for the same. Prints each answer and whether the
three agree; exit status 1 when llama.cpp fails to load a file or an answer differs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["The capital of France is", "Once upon a time, a small fox", "def fibonacci(n):"]
TOKENS = 16
PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "llama-cpp.sh"


def llama_completions(llama_dir: Path, model: Path, port: int, lora: Path | None = None) -> list[str]:
    args = ["bash", str(PEERS), "serve", str(llama_dir), str(model), str(port), "-c", "512", "-np", "1"]
    if lora is not None:
        args += ["--lora", str(lora)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        out = []
        for prompt in PROMPTS:
            r = httpx.post(f"http://127.0.0.1:{port}/completion", timeout=120, json={
                "prompt": prompt, "n_predict": TOKENS, "temperature": 0, "top_k": 1, "cache_prompt": False})
            out.append(r.json()["content"])
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def loraplex_completions(model_dir: str, adapter: Path, use_adapter: bool = True) -> list[str]:
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_engine_args(EngineArgs(model=model_dir, dtype="float32", enable_lora=True,
                                                   max_lora_rank=64), hook_factory=create_lora_runtime)
    engine.adapter_hook.register_adapter("a", 1, 1, str(adapter))
    texts = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.tokenizer(prompt)["input_ids"],
                           SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True),
                           adapter=(1, 1) if use_adapter else None)
        texts[str(i)] = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id] += out.text
    return [texts[str(i)] for i in range(len(PROMPTS))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("llama_dir", type=Path)
    p.add_argument("--adapter", type=Path, default=None)
    args = p.parse_args()
    from loraplex.adapters.export import export_gguf, export_gguf_lora
    from loraplex.adapters.synthetic import write_random_peft
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.llm_engine import _read_model_config
    model_dir = str(ensure_default_model())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter = args.adapter or write_random_peft(tmp / "adapter", _read_model_config(model_dir), r=8, seed=1,
                                                    std=0.05, target_modules=("q_proj", "k_proj", "v_proj",
                                                                              "o_proj", "gate_proj", "up_proj",
                                                                              "down_proj"))
        merged = export_gguf(Path(model_dir), adapter, tmp / "merged.gguf", "f32")
        lora = export_gguf_lora(Path(model_dir), adapter, tmp / "lora.gguf")
        base = tmp / "base.gguf"
        subprocess.run(["bash", str(PEERS), "convert", str(args.llama_dir), model_dir, str(base), "f32"], check=True,
                       stdout=subprocess.DEVNULL)
        ours = loraplex_completions(model_dir, adapter)
        base_only = loraplex_completions(model_dir, adapter, use_adapter=False)
        results = {"loraplex (adapter served)": ours}
        ok = base_only != ours  # else the adapter changes nothing and the check proves little
        if not ok:
            print("the adapter does not change loraplex's answers: use a stronger one (--adapter)")
        for name, run in (("llama.cpp, merged GGUF", lambda: llama_completions(args.llama_dir, merged, 18431)),
                          ("llama.cpp, base + GGUF LoRA", lambda: llama_completions(args.llama_dir, base, 18432,
                                                                                     lora))):
            try:
                results[name] = run()
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name}: FAILED to run: {e}")
                ok = False
        for i, prompt in enumerate(PROMPTS):
            print(f"\n{prompt!r}")
            print(f"  {'loraplex base (no adapter)':>28}: {json.dumps(base_only[i])}")
            for name, texts in results.items():
                same = "" if texts[i] == ours[i] else "   <-- differs"
                ok &= texts[i] == ours[i]
                print(f"  {name:>28}: {json.dumps(texts[i])}{same}")
        print("\nall agree" if ok else "\nNOT all agree")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
