"""`loraplex export`: an adapter merged into its base as a Hugging Face folder or a GGUF file, or the adapter
alone as a GGUF LoRA for llama.cpp (adapters/export.py)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("loraplex.export")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="merge an adapter into its base model (HF folder or GGUF), or write it as a "
                       "GGUF LoRA for llama.cpp")
    p.add_argument("--adapter", required=True, help="an adapter name in the store (--adapter-dir) or a PEFT folder")
    p.add_argument("--version", type=int, default=None, help="the stored version (default: the newest)")
    p.add_argument("--model", default=None, help="the base model's Hugging Face folder (default: the default model)")
    p.add_argument("--adapter-dir", default=None, help="the adapter store (default: as `loraplex serve`)")
    p.add_argument("--database", default=None, metavar="URL",
                   help="the store's database when it is shared (as `loraplex serve --database`)")
    p.add_argument("--blob-store", default=None, metavar="URL",
                   help="the store's files when they are shared (as `loraplex serve --blob-store`)")
    p.add_argument("--merge", action="store_true", help="merge into the base weights (without it: a GGUF LoRA)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="with --merge: a Hugging Face folder "
                   "(safetensors, config, tokenizer, chat template) or one GGUF file")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="--format hf: the merged weights' dtype (auto: the base checkpoint's)")
    p.add_argument("--gguf-type", choices=["f32", "bf16", "q8_0"], default=None,
                   help="GGUF tensor type (default: bf16 merged, f32 for a LoRA)")
    p.add_argument("--output", required=True, help="the folder (hf) or .gguf file to write")
    p.set_defaults(run=run_export)


def run_export(ns: argparse.Namespace) -> int:
    import torch

    from loraplex.engine.paths import default_adapter_dir

    from .export import (
        ExportError,
        export_gguf,
        export_gguf_lora,
        export_hf,
        resolve_adapter_folder,
    )
    try:
        adapter_dir = Path(ns.adapter_dir) if ns.adapter_dir else default_adapter_dir()
        adapter = resolve_adapter_folder(ns.adapter, adapter_dir, ns.version, database=ns.database,
                                         blob_store=ns.blob_store)
        if ns.model is None:
            from loraplex.engine.default_model import ensure_default_model
            base = Path(ensure_default_model(progress=logger.info))
        else:
            base = Path(ns.model)
        out = Path(ns.output)
        if not ns.merge:
            if ns.format == "hf" and ns.gguf_type is None and out.suffix != ".gguf":
                raise ExportError("without --merge the export is a GGUF LoRA: give --output FILE.gguf (a PEFT "
                                  "folder is what `GET /v1/adapters/NAME/content` downloads)")
            path = export_gguf_lora(base, adapter, out, ns.gguf_type or "f32")
        elif ns.format == "gguf":
            path = export_gguf(base, adapter, out, ns.gguf_type or "bf16")
        else:
            dtype = None if ns.dtype == "auto" else getattr(torch, ns.dtype)
            path = export_hf(base, adapter, out, dtype)
    except (ExportError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    print(path)
    return 0
