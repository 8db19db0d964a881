"""The `loraplex` command: `serve` (the default) runs the OpenAI-compatible server, `download` fetches
the default model."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from loraplex.engine.engine_args import EngineArgs, parse_size_bytes

logger = logging.getLogger("loraplex.serve")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def default_served_model_name(model: str | None) -> str:
    """The model folder's name (a .gguf file's stem); the default model's own name when none is given."""
    if model is None:
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def _size(text: str) -> int:
    try:
        return parse_size_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server (the default command)")
    add_serve_args(serve)
    sub.add_parser("download", help="fetch and convert the default model into the local cache, build the CPU kernels")
    quantize = sub.add_parser("quantize", help="write a quantized copy of a model folder (GPTQ or EXL2 format, "
                              "round-to-nearest) that `serve --model` loads")
    quantize.add_argument("--format", choices=["gptq", "exl2"], default="gptq")
    quantize.add_argument("--model", default=None, help="HF-layout folder (default: the default model)")
    quantize.add_argument("--output", required=True, help="the folder to write")
    quantize.add_argument("--bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=4,
                          help="bits per weight (gptq: 4 or 8; exl2: 2, 3, 4, 5, 6 or 8)")
    quantize.add_argument("--group-size", type=int, default=None,
                          help="input channels per scale (gptq default 128, -1: per row; exl2 default 32, "
                               "a multiple of 32)")
    quantize.add_argument("--asym", action="store_true", help="gptq: asymmetric (per-group zero points)")
    quantize.add_argument("--desc-act", action="store_true", help="gptq: act-order grouping (g_idx)")
    train = sub.add_parser("train", help="fine-tune several LoRA adapters together from a YAML config, no server "
                           "(see trainer/offline.py for the keys); writes PEFT folders")
    train.add_argument("config", help="the YAML file; data paths in it are relative to its folder")
    train.add_argument("--no-progress", action="store_true", help="log lines only, no progress bars")
    from loraplex.bench.cli import add_bench_parser
    add_bench_parser(sub)
    return parser


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face-layout folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--quantization", "-q", default="none", choices=["none", "nf4", "int8", "gptq", "exl2"],
                   help="base weights: nf4/int8 quantize at load (bitsandbytes); gptq/exl2 name the checkpoint's format")
    p.add_argument("--kv-cache-memory-bytes", type=_size, default=1 << 30, metavar="SIZE",
                   help="KV cache size, e.g. 2GiB or 512MiB (default: 1GiB)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: a request's greedy output is exactly the same alone or in any batch "
                        "(--no-batch-invariant: ~10%% faster batch-1 decode)")
    p.add_argument("--max-queue-len", type=int, default=256,
                   help="waiting requests beyond this get 429 with Retry-After")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) clients use in `model` (default: the model folder's name)")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (also env LORAPLEX_API_KEY)")
    p.add_argument("--admin-api-key", default=os.environ.get("LORAPLEX_ADMIN_API_KEY"),
                   help="the only key accepted on endpoints that change adapters (also env LORAPLEX_ADMIN_API_KEY)")
    lora = p.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=True,
                      help="serve LoRA adapters from a paged pool (default: on)")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                      help="PEFT folders to publish and serve at start-up")
    lora.add_argument("--adapter-dir", default=None,
                      help="the adapter store (SQLite + files; default: ~/.cache/loraplex/adapters)")
    lora.add_argument("--max-loras", type=int, default=32, help="distinct adapters in one batch")
    lora.add_argument("--max-lora-rank", type=int, default=64)
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept in the host-memory tier (default: sized from the pool)")
    lora.add_argument("--lora-pool-pages", type=int, default=None,
                      help="pool size in pages (one page = one rank-row of every target linear)")
    lora.add_argument("--lora-pool-bytes", type=_size, default=256 << 20, metavar="SIZE",
                      help="pool size when --lora-pool-pages is not given (default: 256MiB)")
    lora.add_argument("--max-upload-bytes", type=_size, default=512 << 20, metavar="SIZE",
                      help="largest adapter archive accepted by POST /v1/adapters (default: 512MiB)")
    ft = p.add_argument_group("fine-tuning (OpenAI's /v1/files and /v1/fine_tuning/jobs; needs LoRA)")
    ft.add_argument("--fine-tuning-dir", default=None,
                    help="the fine-tuning job store (SQLite + uploaded files + checkpoints; "
                         "default: ~/.cache/loraplex/fine_tuning)")
    ft.add_argument("--max-file-bytes", type=_size, default=64 << 20, metavar="SIZE",
                    help="largest training file accepted by POST /v1/files (default: 64MiB)")
    ft.add_argument("--enable-training", action=argparse.BooleanOptionalAction, default=True,
                    help="train fine-tuning jobs in this process beside live traffic (default: on with LoRA; on "
                         "CPU the base linears then keep a dense copy of their weights for the backward pass)")
    ft.add_argument("--train-share", type=float, default=0.25,
                    help="largest share of the engine loop's time training takes while requests are running or "
                         "waiting; all of it when idle (default: 0.25)")
    ft.add_argument("--max-train-jobs", type=int, default=4, help="jobs batched into one training step (default: 4)")
    ft.add_argument("--train-gradient-checkpointing", action="store_true",
                    help="recompute activations in the backward pass (less memory, ~30%% more compute)")
    ft.add_argument("--train-chunk-tokens", type=int, default=1024,
                    help="a training step runs in slices (one decoder layer of a chunk of about this many tokens) "
                         "with inference steps in between: smaller keeps decode latency lower (default: 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model, dtype=ns.dtype, device=ns.device, max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        block_size=ns.block_size, kv_cache_memory_bytes=ns.kv_cache_memory_bytes, quantization=ns.quantization,
        enable_prefix_caching=ns.enable_prefix_caching, max_queue_len=ns.max_queue_len, seed=ns.seed,
        batch_invariant=ns.batch_invariant, enable_lora=ns.enable_lora, max_loras=ns.max_loras, max_lora_rank=ns.max_lora_rank,
        max_cpu_loras=ns.max_cpu_loras, lora_pool_pages=ns.lora_pool_pages, lora_pool_bytes=ns.lora_pool_bytes,
        # the engine side's TrainingRuntime opens the same job store as the HTTP process's FineTuningService
        enable_training=ns.enable_lora and ns.enable_training, fine_tuning_dir=str(fine_tuning_dir_from(ns)),
        train_share=ns.train_share, max_train_jobs=ns.max_train_jobs,
        train_gradient_checkpointing=ns.train_gradient_checkpointing, train_chunk_tokens=ns.train_chunk_tokens)


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    modules = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH, got {item!r}")
        modules[name] = path
    return modules


def default_adapter_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loraplex" / "adapters"


def fine_tuning_dir_from(ns: argparse.Namespace) -> Path:
    from loraplex.trainer.service import default_fine_tuning_dir
    """The one job store both processes open: --fine-tuning-dir, else the default."""
    return Path(ns.fine_tuning_dir).expanduser() if ns.fine_tuning_dir else default_fine_tuning_dir()


def serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from loraplex.adapters.archive import UploadLimits
    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.serve.adapter_service import AdapterService, AdapterSettings
    from loraplex.serve.app import build_app
    from loraplex.serve.fine_tuning_service import FineTuningService, FineTuningSettings
    from loraplex.trainer.service import create_training_runtime

    try:
        args = engine_args_from(ns)
        lora_modules = parse_lora_modules(ns.lora_modules)
        # weights barely compress: a decompressed size far above the archive's is a bomb
        upload_limits = UploadLimits(max_archive_bytes=ns.max_upload_bytes, max_total_bytes=2 * ns.max_upload_bytes,
                                     max_file_bytes=2 * ns.max_upload_bytes)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if lora_modules and not ns.enable_lora:
        logger.error("--lora-modules needs LoRA enabled (drop --no-enable-lora)")
        return 2
    if ns.max_file_bytes <= 0:
        logger.error("--max-file-bytes must be positive")
        return 2
    fine_tuning_dir = fine_tuning_dir_from(ns)  # the engine side needs the same path (see engine_args_from)
    served_names = ns.served_model_name or [default_served_model_name(ns.model)]
    logger.info("loading %s", ns.model or DEFAULT_MODEL_NAME)
    try:
        engine = AsyncEngine.from_engine_args(args, hook_factory=create_lora_runtime if ns.enable_lora else None,
                                              background_factory=create_training_runtime if args.enable_training
                                              else None)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        logger.error("cannot load the model: %s", exc)
        return 1
    adapters = None
    if ns.enable_lora:
        settings = AdapterSettings(Path(ns.adapter_dir) if ns.adapter_dir else default_adapter_dir(),
                                   max_lora_rank=ns.max_lora_rank, upload_limits=upload_limits)
        adapters = AdapterService(engine, settings, served_names)
        logger.info("adapter store: %s", settings.adapter_dir)
    fine_tuning = None
    if adapters is not None and args.enable_training:  # a fine-tuned model is served as an adapter
        fine_tuning = FineTuningService(engine, adapters, FineTuningSettings(fine_tuning_dir, ns.max_file_bytes),
                                        served_names)
        logger.info("fine-tuning job store: %s", fine_tuning_dir)
    app = build_app(engine, served_names, api_key=ns.api_key, admin_api_key=ns.admin_api_key,
                    adapters=adapters, lora_modules=lora_modules, fine_tuning=fine_tuning)
    if ns.api_key:
        logger.info("API key required on /v1/*")
    # log_config=None: uvicorn's loggers propagate to the root handler set up in main().
    # The lifespan stops the engine process; if uvicorn never starts (port taken), the process is a
    # daemon and ends with this one.
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, log_config=None)
    return 0


def quantize(ns: argparse.Namespace) -> int:
    if ns.format == "gptq" and ns.bits not in (4, 8):
        logger.error("--format gptq takes --bits 4 or 8")
        return 2
    if ns.format == "exl2" and (ns.asym or ns.desc_act):
        logger.error("--asym and --desc-act apply to --format gptq only")
        return 2
    model = ns.model
    if model is None:
        from loraplex.engine.default_model import ensure_default_model
        model = str(ensure_default_model(progress=print))
    try:
        if ns.format == "exl2":
            from loraplex.engine.exl2 import export_exl2
            group_size = 32 if ns.group_size is None else ns.group_size
            out = export_exl2(Path(model), Path(ns.output), bits=ns.bits, group_size=group_size, progress=print)
        else:
            from loraplex.engine.gptq import export_gptq
            group_size = 128 if ns.group_size is None else ns.group_size
            out = export_gptq(Path(model), Path(ns.output), bits=ns.bits, group_size=group_size, sym=not ns.asym,
                              desc_act=ns.desc_act, progress=print)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    print(out)
    return 0


def train(ns: argparse.Namespace) -> int:
    from loraplex.trainer.data import DataError
    from loraplex.trainer.offline import load_config, run_config
    path = Path(ns.config)
    try:
        summary = run_config(load_config(path), base_dir=path.parent, progress=not ns.no_progress)
    except (ValueError, DataError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    for name, result in summary.items():
        print(f"{name}: {result['path']} (steps {result['steps']}, train_loss {result['train_loss']:.4f}, "
              f"valid_loss {result['valid_loss'] if result['valid_loss'] is None else round(result['valid_loss'], 4)})")
    return 0


def download() -> int:
    from loraplex.engine import cpu_kernels
    from loraplex.engine.default_model import ensure_default_model

    print(ensure_default_model(progress=print))
    if cpu_kernels.enabled():  # build the CPU kernels now rather than at the first server start
        print("CPU kernels:", "ready" if cpu_kernels.available() else
              f"unavailable, the plain-torch path will be used ({cpu_kernels.build_error()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]  # `loraplex` alone, or with only flags, means `loraplex serve`
    ns = build_parser().parse_args(argv)
    level = getattr(ns, "log_level", "info").upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if ns.command == "download":
        return download()
    if ns.command == "quantize":
        return quantize(ns)
    if ns.command == "train":
        return train(ns)
    if ns.command == "bench":
        from loraplex.bench.cli import run_bench
        return run_bench(ns)
    return serve(ns)


if __name__ == "__main__":
    sys.exit(main())
