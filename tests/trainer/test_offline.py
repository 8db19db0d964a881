"""`loraplex train CONFIG.yaml`: several jobs trained together, PEFT folders out; the exported adapter gives
the same logits in peft as in loraplex."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from loraplex.trainer.offline import load_config, run_config
from tests.engine.test_cuda import tiny_model_dir  # noqa: F401 - fixture

CHAT = [{"messages": [{"role": "user", "content": f"What is the code word {i}?"},
                      {"role": "assistant", "content": f"The code word {i} is zebra."}]} for i in range(6)]
ALPACA = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ("one", "two", "three", "four")]


@pytest.fixture()
def config(tiny_model_dir, tmp_path):  # noqa: F811
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in CHAT))
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA))
    return {"model": str(tiny_model_dir), "output_dir": "out", "max_jobs": 2, "jobs": [
        {"name": "code-words", "data": "chat.jsonl", "max_length": 64, "eval_every": 1,
         "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
         "hyperparameters": {"n_epochs": 2, "batch_size": 2, "micro_batch_size": 1, "learning_rate": 1e-3}},
        {"name": "alpaca-words", "data": "alpaca.json", "template": "alpaca", "packing": True,
         "validation_fraction": 0.25, "early_stopping_patience": 1,
         "lora": {"r": 8, "alpha": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"],
                  "use_rslora": True},
         "hyperparameters": {"n_epochs": 3, "batch_size": 3, "learning_rate": 1e-3, "seed": 3}},
    ]}


def test_train_config_writes_peft_folders_that_peft_reads_alike(config, tmp_path, tiny_model_dir):  # noqa: F811
    peft = pytest.importorskip("peft")
    import transformers

    from loraplex.adapters.peft import load_adapter
    from loraplex.engine.loader import load_model
    from loraplex.trainer.batch import build_training_batch
    from loraplex.trainer.data import PackedSequence
    from loraplex.trainer.lora_layers import (
        JobLoRA,
        LoRASpec,
        TrainSegment,
        attach_training,
    )

    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    summary = run_config(load_config(tmp_path / "train.yaml"), base_dir=tmp_path, progress=False)
    assert set(summary) == {"code-words", "alpaca-words"}
    assert summary["code-words"]["steps"] == 2 * 3  # 5 training examples (1 held out), batches of 2, 2 epochs
    assert summary["code-words"]["valid_loss"] is not None
    folder = tmp_path / "out" / "code-words"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 8, ["q_proj", "v_proj"])
    assert json.loads((tmp_path / "out" / "alpaca-words" / "adapter_config.json").read_text())["use_rslora"]

    model, model_config = load_model(tiny_model_dir, torch.float32)
    weights = load_adapter(folder, model_config, max_lora_rank=64)  # our reader validates it against the base
    assert weights.rank == 4
    # loraplex's forward with the exported weights vs peft's
    state = attach_training(model, model_config.num_hidden_layers)
    lora = JobLoRA(LoRASpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")), model_config)
    from safetensors.torch import load_file
    lora.load_peft_state_dict(load_file(folder / "adapter_model.safetensors"))
    ids = list(range(10, 40))
    tb = build_training_batch([[PackedSequence(ids, ids, [len(ids)])]], model_config, torch.float32,
                              torch.device("cpu"))
    state.segments = [TrainSegment(0, len(ids), lora)]
    with torch.no_grad():
        ours = model.compute_logits(model(tb.batch, tb.kv_caches))
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    theirs = peft.PeftModel.from_pretrained(hf, str(folder))
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor([ids])).logits[0]
    base = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
    assert (ours - want).abs().max() <= 1e-4
    with torch.no_grad(), theirs.disable_adapter():
        assert (base(input_ids=torch.tensor([ids])).logits[0] - want).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("change,message", [
    ({"jobs": []}, "no jobs"),
    ({"epochs": 3}, "unknown top-level keys"),
    ({"jobs": [{"name": "../x", "data": "chat.jsonl"}]}, "must match"),
    ({"jobs": [{"name": "a", "data": "chat.jsonl"}, {"name": "a", "data": "chat.jsonl"}]}, "unique"),
    ({"jobs": [{"name": "a", "data": "chat.jsonl", "lora": {"rank": 4}}]}, "unknown keys"),
    ({"jobs": [{"name": "a", "data": "chat.jsonl", "lora": {"r": 0}}]}, "rank must be"),
    ({"jobs": [{"name": "a", "data": "chat.jsonl", "hyperparameters": {"learning_rate": -1}}]}, "learning_rate"),
])
def test_bad_configs_fail_clearly(config, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        run_config(config | change, base_dir=tmp_path, progress=False)


def test_cli_train(config, tmp_path, capsys):
    from loraplex.serve.cli import main
    config["jobs"] = config["jobs"][:1]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "train.yaml"), "--no-progress"]) == 0
    assert "code-words: " in capsys.readouterr().out
    assert (tmp_path / "out" / "code-words" / "adapter_model.safetensors").is_file()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config | {"jobs": [{"name": "x", "data": "missing.jsonl"}]}))
    assert main(["train", str(tmp_path / "bad.yaml"), "--no-progress"]) == 2
