"""The `loraplex` command: `serve` (the default) runs the OpenAI-compatible server; the other commands live with
the package that owns them (`download`, `quantize`: engine/cli.py; `train`: trainer/cli.py; `bench`:
bench/cli.py) and are added here."""
from __future__ import annotations

import argparse
import logging
import sys

from loraplex.engine.default_model import MODEL_NAME
from loraplex.serve.server import LOG_FORMAT, add_serve_args, build_server_app, check_serve_args
from loraplex.storage.database import StorageUnavailableError

logger = logging.getLogger("loraplex.serve")

DESCRIPTION = ("One base LLM, many LoRA adapters, behind an OpenAI-compatible API: `loraplex serve` (the default "
               "command) and the tools around it.")


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


def run_serve(ns: argparse.Namespace) -> int:
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.engine.engine_core import ImportedFactory

    try:
        args, _, _ = check_serve_args(ns)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    logger.info("loading %s", ns.model or MODEL_NAME)
    try:
        # the engine process starts first: this one's imports (torch, the app) run beside its start-up
        engine = AsyncEngine.from_engine_args(
            args, hook_factory=ImportedFactory("loraplex.adapters.runtime:create_lora_runtime") if ns.enable_lora
            else None, background_factory=ImportedFactory("loraplex.trainer.service:create_training_runtime")
            if args.enable_training else None)
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
    import uvicorn

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
