"""The `loraplex` command line: flags to EngineArgs, served names, and the serve/download wiring."""
from __future__ import annotations

import sys
import types

import pytest

from loraplex.engine.default_model import default_served_model_name
from loraplex.engine.engine_args import engine_args_from, fine_tuning_dir_from
from loraplex.serve import cli
from tests.serve.fake_engine import FakeEngine


def _parse(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


def test_flags_map_to_engine_args():
    ns = _parse("--model", "/models/Qwen2-0.5B/", "--dtype", "bfloat16", "--max-model-len", "1024",
                "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
                "--kv-cache-memory-bytes", "2GiB", "--no-enable-prefix-caching", "--max-queue-len", "9",
                "--seed", "3", "--device", "cpu", "--no-batch-invariant")
    args = engine_args_from(ns)
    assert (args.model, args.dtype, args.max_model_len) == ("/models/Qwen2-0.5B/", "bfloat16", 1024)
    assert args.max_num_seqs == 8
    assert (args.max_num_batched_tokens, args.block_size, args.kv_cache_memory_bytes) == (512, 32, 2 << 30)
    assert (args.enable_prefix_caching, args.max_queue_len, args.seed, args.device) == (False, 9, 3, "cpu")
    assert not args.batch_invariant
    defaults = engine_args_from(_parse())
    assert defaults.model is None and defaults.enable_prefix_caching and defaults.kv_cache_memory_bytes == 1 << 30
    assert defaults.batch_invariant


def test_bad_size_is_a_usage_error():
    with pytest.raises(SystemExit):
        _parse("--kv-cache-memory-bytes", "lots")


def test_default_served_model_name():
    assert default_served_model_name(None) == "SmolLM2-135M-Instruct"
    assert default_served_model_name("/m/Qwen2-0.5B/") == "Qwen2-0.5B"
    assert default_served_model_name("/m/tiny.Q4_1.gguf") == "tiny.Q4_1"


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("LORAPLEX_API_KEY", "from-env")
    assert _parse().api_key == "from-env"
    assert _parse("--api-key", "flag").api_key == "flag"


def test_serve_builds_engine_and_runs_uvicorn(monkeypatch, tmp_path):
    fake_module = types.ModuleType("loraplex.engine.async_engine")
    fake_module.AsyncEngine = FakeEngine
    monkeypatch.setitem(sys.modules, "loraplex.engine.async_engine", fake_module)
    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    assert cli.main(["--port", "9001", "--served-model-name", "a", "b", "--api-key", "k",
                     "--max-model-len", "64", "--adapter-dir", str(tmp_path / "store"), "--max-loras", "4",
                     "--fine-tuning-dir", str(tmp_path / "ft"), "--max-file-bytes", "1MiB"]) == 0
    app = seen["app"]
    assert app.state.adapters.settings.adapter_dir == tmp_path / "store"
    ft = app.state.fine_tuning
    assert ft.settings.max_file_bytes == 1 << 20 and ft.store.root == (tmp_path / "ft").resolve()
    assert ft.adapters is app.state.adapters
    assert app.state.engine.engine_args.enable_lora and app.state.engine.engine_args.max_loras == 4
    # handed over by name (imported in the engine process), the real factories
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.trainer.service import create_training_runtime
    assert app.state.engine.hook_factory.resolve() is create_lora_runtime
    assert app.state.engine.background_factory.resolve() is create_training_runtime
    args = app.state.engine.engine_args
    assert args.enable_training and args.fine_tuning_dir == str(tmp_path / "ft") and args.train_share == 0.25
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 9001)
    assert app.state.served_model_names == ["a", "b"]
    assert app.state.engine.engine_args.max_model_len == 64


def test_fine_tuning_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ns = _parse()
    assert ns.max_file_bytes == 64 << 20
    assert fine_tuning_dir_from(ns) == tmp_path / "cache" / "loraplex" / "fine_tuning"
    assert fine_tuning_dir_from(_parse("--fine-tuning-dir", str(tmp_path / "ft"))) == tmp_path / "ft"


def test_no_fine_tuning_without_lora(monkeypatch, tmp_path):
    fake_module = types.ModuleType("loraplex.engine.async_engine")
    fake_module.AsyncEngine = FakeEngine
    monkeypatch.setitem(sys.modules, "loraplex.engine.async_engine", fake_module)
    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: seen.update(app=app, **kw))
    assert cli.main(["--no-enable-lora", "--fine-tuning-dir", str(tmp_path / "ft")]) == 0
    assert seen["app"].state.fine_tuning is None and not (tmp_path / "ft").exists()


def test_download_calls_ensure_default_model(monkeypatch, capsys):
    fake_module = types.ModuleType("loraplex.engine.default_model")
    fake_module.ensure_default_model = lambda progress=print: "/cache/SmolLM2-135M-Instruct"
    monkeypatch.setitem(sys.modules, "loraplex.engine.default_model", fake_module)
    assert cli.main(["download"]) == 0
    assert "/cache/SmolLM2-135M-Instruct" in capsys.readouterr().out


def test_quantize_writes_a_gptq_folder_that_loads(tmp_path):
    import torch
    import transformers

    from loraplex.engine.loader import load_model
    from loraplex.engine.quant.gptq import GPTQLinear
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    assert cli.main(["quantize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "q"),
                     "--group-size", "32"]) == 0
    model, _ = load_model(tmp_path / "q", torch.float32)
    assert model.quant_method == "gptq"
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14


def test_quantize_picks_whole_groups_by_default(tmp_path, capsys):
    """Without --group-size: 128 unless it does not divide every input width (here 96 and 192): then 32, so the
    streaming CPU kernel takes every linear."""
    import json

    import transformers
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                                      num_attention_heads=3, num_key_value_heads=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    assert cli.main(["quantize", "--model", str(tmp_path / "m"), "--output", str(tmp_path / "q"), "--bits", "8"]) == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert "--group-size 32" in capsys.readouterr().out


def test_quantize_writes_an_exl2_folder_that_loads(tmp_path):
    import json

    import torch
    import transformers

    from loraplex.engine.loader import load_model
    from loraplex.engine.quant.exl2 import EXL2Linear
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    assert cli.main(["quantize", "--format", "exl2", "--bits", "5", "--model", str(tmp_path / "m"),
                     "--output", str(tmp_path / "q")]) == 0
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qconfig["quant_method"], qconfig["bits"], qconfig["group_size"]) == ("exl2", 5.0, 32)
    model, _ = load_model(tmp_path / "q", torch.float32)
    assert model.quant_method == "exl2"
    linears = [m for m in model.modules() if isinstance(m, EXL2Linear)]
    assert len(linears) == 14 and {m.group_bits for m in linears} == {(5,) * 2, (5,) * 4}  # K = 64 or 128
    assert cli.main(["quantize", "--format", "gptq", "--bits", "5", "--model", str(tmp_path / "m"),
                     "--output", str(tmp_path / "g")]) == 2
    assert cli.main(["quantize", "--format", "exl2", "--group-size", "48", "--model", str(tmp_path / "m"),
                     "--output", str(tmp_path / "e")]) == 2


def test_cluster_flags_are_checked_before_ray_starts(tmp_path, caplog):
    """`loraplex cluster`: the autoscaling config is Ray Serve's, validated up front (rc 2 and a message, no Ray
    started); JSON or @file; routing knobs must be positive."""
    pytest.importorskip("ray.serve")
    import ray

    from loraplex.serve.cluster import check_cluster_args

    def parse(*argv: str):
        return cli.build_parser().parse_args(["cluster", *argv])
    good = tmp_path / "scale.json"
    good.write_text('{"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8}')
    ns = parse("--autoscaling-config", f"@{good}", "--spread-queue", "8")
    check_cluster_args(ns)
    assert ns.autoscaling_config["max_replicas"] == 3 and ns.spread_queue == 8
    with pytest.raises(SystemExit):
        parse("--autoscaling-config", "[1, 2]")
    with pytest.raises(SystemExit):
        parse("--autoscaling-config", "{not json")
    for argv, message in ((["--autoscaling-config", '{"min_replicas": 4, "max_replicas": 2}'], "min_replicas"),
                          (["--autoscaling-config", '{"max_replicas": 2, "bogus": 1}'], "bogus"),
                          (["--spread-queue", "0"], "--spread-queue"),
                          (["--routing-stats-period", "0"], "--routing-stats-period")):
        with pytest.raises(ValueError, match=message):
            check_cluster_args(parse(*argv))
    assert cli.main(["cluster", "--spread-queue", "0"]) == 2  # said, and nothing started
    assert "--spread-queue must be at least 1" in caplog.text
    assert not ray.is_initialized()


def test_cluster_flags_reach_the_engine_deployment():
    """The autoscaling config and the router's settings are on the engine deployment Ray gets, not dropped."""
    pytest.importorskip("ray.serve")
    from loraplex.serve.cluster import build_application
    app = build_application(["--autoscaling-config", '{"min_replicas": 1, "max_replicas": 3}',
                             "--spread-queue", "5", "--routing-stats-period", "0.5", "--max-num-seqs", "8"])
    engine = app._bound_deployment.init_args[0]._bound_deployment
    config = engine._deployment_config
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 3)
    router = config.request_router_config
    assert router.request_router_class == "loraplex.serve.cluster_router.AdapterRouter"
    assert router.request_router_kwargs == {"spread_at": 5} and router.request_routing_stats_period_s == 0.5
    assert config.max_ongoing_requests == 8 + 256
    fixed = build_application(["--num-replicas", "3"])._bound_deployment.init_args[0]._bound_deployment
    assert fixed._deployment_config.autoscaling_config is None and fixed.num_replicas == 3
    default = fixed._deployment_config.request_router_config.request_router_kwargs
    assert default == {"spread_at": 64}  # a full batch (--max-num-seqs)


def test_cluster_builder_takes_a_ray_serve_config_args_dict():
    """`import_path: loraplex.serve.cluster:build_application` with `args: {flags: [...]}` (deploy/k8s RayService)."""
    pytest.importorskip("ray.serve")
    from loraplex.serve.cluster import build_application
    app = build_application({"flags": ["--num-replicas", "3", "--max-num-seqs", 8]})
    engine = app._bound_deployment.init_args[0]._bound_deployment
    assert engine.num_replicas == 3 and engine._deployment_config.max_ongoing_requests == 8 + 256
    with pytest.raises(ValueError, match="flags"):
        build_application({"num_replicas": 3})
