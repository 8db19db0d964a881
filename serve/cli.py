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
    sub.add_parser("download", help="fetch and convert the default model into the local cache")
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
    p.add_argument("--kv-cache-memory-bytes", type=_size, default=1 << 30, metavar="SIZE",
                   help="KV cache size, e.g. 2GiB or 512MiB (default: 1GiB)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-queue-len", type=int, default=256,
                   help="waiting requests beyond this get 429 with Retry-After")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) clients use in `model` (default: the model folder's name)")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (also env LORAPLEX_API_KEY)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=ns.model, dtype=ns.dtype, device=ns.device, max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        block_size=ns.block_size, kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        enable_prefix_caching=ns.enable_prefix_caching, max_queue_len=ns.max_queue_len, seed=ns.seed)


def serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.serve.app import build_app

    try:
        args = engine_args_from(ns)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    served_names = ns.served_model_name or [default_served_model_name(ns.model)]
    logger.info("loading %s", ns.model or DEFAULT_MODEL_NAME)
    try:
        engine = AsyncEngine.from_engine_args(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        logger.error("cannot load the model: %s", exc)
        return 1
    app = build_app(engine, served_names, api_key=ns.api_key)
    if ns.api_key:
        logger.info("API key required on /v1/*")
    # log_config=None: uvicorn's loggers propagate to the root handler set up in main().
    # The lifespan stops the engine process; if uvicorn never starts (port taken), the process is a
    # daemon and ends with this one.
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, log_config=None)
    return 0


def download() -> int:
    from loraplex.engine.default_model import ensure_default_model

    print(ensure_default_model(progress=print))
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
    return serve(ns)


if __name__ == "__main__":
    sys.exit(main())
