"""The engine's commands: `loraplex download` (the default model and the CPU kernels) and `loraplex quantize`
(a GPTQ or EXL2 copy of a model folder). `loraplex` itself is serve/cli.py, which adds these."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("loraplex.engine")


def add_parsers(sub) -> None:
    download = sub.add_parser("download", help="fetch and convert the default model into the local cache, "
                              "build the CPU kernels")
    download.set_defaults(run=lambda ns: run_download())
    quantize = sub.add_parser("quantize", help="write a quantized copy of a model folder (GPTQ or EXL2 format, "
                              "round-to-nearest) that `serve --model` loads")
    quantize.add_argument("--format", choices=["gptq", "exl2"], default="gptq")
    quantize.add_argument("--model", default=None, help="HF-layout folder (default: the default model)")
    quantize.add_argument("--output", required=True, help="the folder to write")
    quantize.add_argument("--bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=4,
                          help="bits per weight (gptq: 4 or 8; exl2: 2, 3, 4, 5, 6 or 8)")
    quantize.add_argument("--group-size", type=int, default=None,
                          help="input channels per scale (gptq default 128, or 64 or 32 when 128 does not divide the "
                               "model's input widths; -1: per row; exl2 default 32, a multiple of 32)")
    quantize.add_argument("--asym", action="store_true", help="gptq: asymmetric (per-group zero points)")
    quantize.add_argument("--desc-act", action="store_true", help="gptq: act-order grouping (g_idx)")
    quantize.add_argument("--lm-head", action="store_true",
                          help="gptq: quantize the output head too, like the layers (GPTQModel's lm_head=True; a head "
                               "tied to the embedding is written untied). On small models the head is a fifth of "
                               "the weights: decode reads ~2x fewer bytes per token at 4 bits")
    quantize.set_defaults(run=run_quantize)


def run_download() -> int:
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.kernels import cpu_kernels

    print(ensure_default_model(progress=print))
    if cpu_kernels.enabled():  # build the CPU kernels now rather than at the first server start
        print("CPU kernels:", "ready" if cpu_kernels.available() else
              f"unavailable, the plain-torch path will be used ({cpu_kernels.build_error()})")
    return 0


def default_group_size(model: str) -> int:
    """GPTQ groups of 128 input channels, or of 64 or 32 when 128 does not divide every linear's input width (the
    default model's 576): whole groups are what the streaming CPU kernel (engine/quant/stream.py) takes."""
    from loraplex.engine.llm_engine import _read_model_config
    c = _read_model_config(model)
    widths = {c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim}
    size = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 128)
    if size != 128:
        print(f"--group-size {size}: 128 does not divide every input width ({sorted(widths)})")
    return size


def run_quantize(ns: argparse.Namespace) -> int:
    if ns.format == "gptq" and ns.bits not in (4, 8):
        logger.error("--format gptq takes --bits 4 or 8")
        return 2
    if ns.format == "exl2" and (ns.asym or ns.desc_act or ns.lm_head):
        logger.error("--asym, --desc-act and --lm-head apply to --format gptq only")
        return 2
    model = ns.model
    if model is None:
        from loraplex.engine.default_model import ensure_default_model
        model = str(ensure_default_model(progress=print))
    try:
        if ns.format == "exl2":
            from loraplex.engine.quant.exl2 import export_exl2
            group_size = 32 if ns.group_size is None else ns.group_size
            out = export_exl2(Path(model), Path(ns.output), bits=ns.bits, group_size=group_size, progress=print)
        else:
            from loraplex.engine.quant.gptq import export_gptq
            group_size = default_group_size(model) if ns.group_size is None else ns.group_size
            out = export_gptq(Path(model), Path(ns.output), bits=ns.bits, group_size=group_size, sym=not ns.asym,
                              desc_act=ns.desc_act, lm_head=ns.lm_head, progress=print)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    print(out)
    return 0
