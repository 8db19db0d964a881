"""The `loraplex` command: `serve` (the default) runs the OpenAI-compatible server; the other commands live with
the package that owns them (`download`, `quantize`: engine/cli.py; `train`: trainer/cli.py; `bench`:
bench/cli.py) and are added here."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from loraplex.engine.default_model import MODEL_NAME, default_served_model_name
from loraplex.engine.engine_args import (
    add_engine_args,
    engine_args_from,
    fine_tuning_dir_from,
    size_arg,
)
from loraplex.engine.paths import default_adapter_dir
from loraplex.storage.database import StorageUnavailableError

logger = logging.getLogger("loraplex.serve")

DESCRIPTION = ("One base LLM, many LoRA adapters, behind an OpenAI-compatible API: `loraplex serve` (the default "
               "command) and the tools around it.")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    from loraplex.adapters.cli import add_parser as add_export_parser
    from loraplex.bench.cli import add_bench_parser
    from loraplex.engine.cli import add_parsers as add_engine_parsers
    from loraplex.trainer.cli import add_parser as add_train_parser

    parser = argparse.ArgumentParser(prog="loraplex", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server (the default command)")
    add_serve_args(serve)
    serve.set_defaults(run=run_serve)
    cluster = sub.add_parser("cluster", help="run the server on Ray Serve: an ingress and N engine replicas "
                             "(shared stores: --database, --blob-store)")
    from loraplex.serve.cluster import add_cluster_args, run_cluster
    add_cluster_args(cluster)
    cluster.set_defaults(run=run_cluster)
    add_engine_parsers(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    add_bench_parser(sub)
    return parser


def add_serve_args(p: argparse.ArgumentParser) -> None:
    groups = add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) clients use in `model` (default: the model folder's name)")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (also env LORAPLEX_API_KEY)")
    p.add_argument("--admin-api-key", default=os.environ.get("LORAPLEX_ADMIN_API_KEY"),
                   help="the only key accepted on endpoints that change adapters (also env LORAPLEX_ADMIN_API_KEY)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    lora = groups["lora"]
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                      help="PEFT folders to publish and serve at start-up")
    lora.add_argument("--adapter-dir", default=None,
                      help="the adapter store (SQLite + files; default: ~/.cache/loraplex/adapters)")
    lora.add_argument("--max-upload-bytes", type=size_arg, default=512 << 20, metavar="SIZE",
                      help="largest adapter archive accepted by POST /v1/adapters (default: 512MiB)")
    groups["fine_tuning"].add_argument("--max-file-bytes", type=size_arg, default=64 << 20, metavar="SIZE",
                                       help="largest training file accepted by POST /v1/files (default: 64MiB)")


def check_serve_args(ns: argparse.Namespace):
    """-> (EngineArgs, --lora-modules, upload limits); ValueError with a message for the user."""
    from loraplex.adapters.archive import UploadLimits
    from loraplex.adapters.peft import parse_lora_modules
    args = engine_args_from(ns)
    lora_modules = parse_lora_modules(ns.lora_modules)
    # weights barely compress: a decompressed size far above the archive's is a bomb
    upload_limits = UploadLimits(max_archive_bytes=ns.max_upload_bytes, max_total_bytes=2 * ns.max_upload_bytes,
                                 max_file_bytes=2 * ns.max_upload_bytes)
    if lora_modules and not ns.enable_lora:
        raise ValueError("--lora-modules needs LoRA enabled (drop --no-enable-lora)")
    if ns.max_file_bytes <= 0:
        raise ValueError("--max-file-bytes must be positive")
    return args, lora_modules, upload_limits


def build_server_app(ns: argparse.Namespace, engine):
    """The HTTP app over `engine` (an AsyncEngine, or the cluster's RemoteEngine) with the adapter and
    fine-tuning services the flags ask for; ValueError / StorageUnavailableError when a store cannot open."""
    from loraplex.serve.adapter_service import AdapterService, AdapterSettings
    from loraplex.serve.app import build_app
    from loraplex.serve.fine_tuning_service import FineTuningService, FineTuningSettings
    args, lora_modules, upload_limits = check_serve_args(ns)
    served_names = ns.served_model_name or [default_served_model_name(ns.model)]
    adapters = fine_tuning = None
    if ns.enable_lora:
        settings = AdapterSettings(Path(ns.adapter_dir) if ns.adapter_dir else default_adapter_dir(),
                                   max_lora_rank=ns.max_lora_rank, upload_limits=upload_limits,
                                   database=ns.database, blob_store=ns.blob_store)
        adapters = AdapterService(engine, settings, served_names)
        logger.info("adapter store: %s (%s, %s)", settings.adapter_dir, adapters.store.db.url_for_logs(),
                    adapters.store.blobs.url)
    if adapters is not None and args.enable_training:  # a fine-tuned model is served as an adapter
        fine_tuning_dir = fine_tuning_dir_from(ns)  # the engine side opens the same store (engine_args_from)
        fine_tuning = FineTuningService(engine, adapters, FineTuningSettings(
            fine_tuning_dir, ns.max_file_bytes, ns.database, ns.blob_store), served_names)
        logger.info("fine-tuning job store: %s", fine_tuning_dir)
    return build_app(engine, served_names, api_key=ns.api_key, admin_api_key=ns.admin_api_key,
                     adapters=adapters, lora_modules=lora_modules, fine_tuning=fine_tuning)


def run_serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from loraplex.adapters.runtime import create_lora_runtime
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.trainer.service import create_training_runtime

    try:
        args, _, _ = check_serve_args(ns)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    logger.info("loading %s", ns.model or MODEL_NAME)
    try:
        engine = AsyncEngine.from_engine_args(args, hook_factory=create_lora_runtime if ns.enable_lora else None,
                                              background_factory=create_training_runtime if args.enable_training
                                              else None)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        logger.error("cannot load the model: %s", exc)
        return 1
    try:
        app = build_server_app(ns, engine)
    except (ValueError, StorageUnavailableError) as exc:  # the engine process is a daemon: it ends with us
        logger.error("cannot open the stores: %s", exc)
        return 1
    if ns.api_key:
        logger.info("API key required on /v1/*")
    # log_config=None: uvicorn's loggers propagate to the root handler set up in main().
    # The lifespan stops the engine process; if uvicorn never starts (port taken), the process is a
    # daemon and ends with this one.
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, log_config=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]  # `loraplex` alone, or with only flags, means `loraplex serve`
    ns = build_parser().parse_args(argv)
    level = getattr(ns, "log_level", "info").upper()
    logging.basicConfig(level=level, format=LOG_FORMAT)
    return ns.run(ns)


if __name__ == "__main__":
    sys.exit(main())
