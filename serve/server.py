"""The server built from `loraplex serve` flags: the flags themselves, their checks, and the HTTP app with its
adapter and fine-tuning services over an engine (`loraplex serve`'s AsyncEngine, or the cluster ingress's
RemoteEngine)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from loraplex.engine.default_model import default_served_model_name
from loraplex.engine.engine_args import (
    add_engine_args,
    engine_args_from,
    fine_tuning_dir_from,
    parse_lora_modules,
    size_arg,
)
from loraplex.engine.paths import default_adapter_dir

logger = logging.getLogger("loraplex.serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    lora.add_argument("--max-adapters-per-request", type=int, default=8, metavar="N",
                      help="most adapters one request may combine in its `adapters` list (default: 8)")
    lora.add_argument("--max-upload-bytes", type=size_arg, default=512 << 20, metavar="SIZE",
                      help="largest adapter archive accepted by POST /v1/adapters (default: 512MiB)")
    groups["fine_tuning"].add_argument("--max-file-bytes", type=size_arg, default=64 << 20, metavar="SIZE",
                                       help="largest training file accepted by POST /v1/files (default: 64MiB)")


def check_serve_args(ns: argparse.Namespace):
    """-> (EngineArgs, --lora-modules, upload limits); ValueError with a message for the user."""
    from loraplex.adapters.archive import UploadLimits
    args = engine_args_from(ns)
    lora_modules = parse_lora_modules(ns.lora_modules)
    # weights barely compress: a decompressed size far above the archive's is a bomb
    upload_limits = UploadLimits(max_archive_bytes=ns.max_upload_bytes, max_total_bytes=2 * ns.max_upload_bytes,
                                 max_file_bytes=2 * ns.max_upload_bytes)
    if lora_modules and not ns.enable_lora:
        raise ValueError("--lora-modules needs LoRA enabled (drop --no-enable-lora)")
    if ns.max_adapters_per_request < 1:
        raise ValueError("--max-adapters-per-request must be at least 1")
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
                                   max_adapters_per_request=ns.max_adapters_per_request,
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
