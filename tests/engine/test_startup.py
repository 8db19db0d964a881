"""What every server and engine start pays for, kept out: the tokenizer of a plain fast-tokenizer folder is read
without AutoTokenizer's model-config import (and is the tokenizer AutoTokenizer makes), building the model on the
meta device imports no torch._dynamo, and the server starts its engine process before it imports torch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from loraplex.engine.llm_engine import load_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, wörld! 12345 <|im_end|>"}]


def fresh_python_prints(code: str, timeout: float) -> str:
    """What `code` prints in a fresh interpreter (whose imports are only its own), after it ran cleanly."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_plain_fast_tokenizer_is_autotokenizers(default_model_dir):
    from transformers import AutoTokenizer
    ours, auto = load_tokenizer(str(default_model_dir)), AutoTokenizer.from_pretrained(str(default_model_dir))
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab() and ours.all_special_tokens == auto.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
        (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id)
    assert ours.chat_template == auto.chat_template and ours.model_max_length == auto.model_max_length
    text = "  Tabs\tand\nnewlines, ünïcödé, 1234567 and <|im_start|>special<|im_end|> tokens "
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == \
        auto.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = auto(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)


def test_the_plain_fast_tokenizer_loads_without_autotokenizer(default_model_dir):
    """Reading it does not import AutoTokenizer's module (~1.2 s alone: the model configs' machinery)."""
    code = ("import sys; from loraplex.engine.llm_engine import load_tokenizer; "
            f"tok = load_tokenizer({str(default_model_dir)!r}); assert tok('hi')['input_ids']; "
            "print('transformers.models.auto.tokenization_auto' in sys.modules)")
    assert fresh_python_prints(code, timeout=300) == "False"


def test_other_tokenizer_classes_still_go_through_autotokenizer(default_model_dir, tmp_path, monkeypatch):
    """A folder naming another class (or none) is AutoTokenizer's to resolve: what it returns is what we return."""
    import transformers
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (default_model_dir / name).exists():
            shutil.copy(default_model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    calls = []
    real = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: calls.append(a) or real(*a, **k))
    tok = load_tokenizer(str(tmp_path))
    assert calls == [(str(tmp_path),)] and tok("hello")["input_ids"]
    calls.clear()
    load_tokenizer(str(default_model_dir))  # the plain fast one: read directly
    assert calls == []


def test_building_the_model_imports_no_dynamo(default_model_dir):
    code = ("import sys; from loraplex.engine.loader import load_model; "
            f"load_model({str(default_model_dir)!r}, 'float32'); "
            "print('torch._dynamo' in sys.modules)")
    assert fresh_python_prints(code, timeout=300) == "False"


def test_the_server_spawns_its_engine_before_importing_torch():
    """What `loraplex serve` imports before it starts the engine process (the CLI, the async engine, its core and
    the factories it hands over by name) holds no torch: the server's own imports run beside the engine's start."""
    code = ("import argparse, sys; import loraplex.serve.cli, loraplex.engine.async_engine, loraplex.engine.engine_core; "
            "from loraplex.serve.server import add_serve_args, check_serve_args; p = argparse.ArgumentParser(); "
            "add_serve_args(p); check_serve_args(p.parse_args(['--lora-modules', 'a=/x', '--dtype', 'float32'])); "
            "print('torch' in sys.modules)")
    assert fresh_python_prints(code, timeout=120) == "False"


def test_an_imported_factory_crosses_a_pickle_and_calls_its_function():
    import pickle

    from loraplex.engine.engine_core import ImportedFactory
    factory = pickle.loads(pickle.dumps(ImportedFactory("math:hypot")))
    assert factory == ImportedFactory("math:hypot") and factory(3.0, 4.0) == 5.0
