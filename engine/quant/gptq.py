"""GPTQ-format int4/int8 weights in plain torch: packing, RTN quantization, dequantization, a reference
linear, and an exporter that writes a Hugging Face folder in the layout GPTQ kernels read.

References: AutoGPTQ `nn_modules/qlinear/qlinear_cuda_old.py` (pack: `zeros -= 1`; torch forward:
`zeros + 1`), the GPTQ repo's `quant.py` Quantizer (min/max and symmetric scale and zero), exllamav2
`exllamav2/exllamav2_ext/cuda/q_gemm_kernel_gptq.cuh` and vLLM `csrc/quantization/gptq/q_gemm.cu`
(both add 1 to each unpacked zero for `checkpoint_format: "gptq"`).

Layout per linear `<prefix>` with `pack = 32 // bits` values per int32, value j at bits [j*bits, (j+1)*bits):
    qweight int32 [in_features // pack, out_features]   packed along the input dim
    qzeros  int32 [num_groups, out_features // pack]    packed along the output dim
    scales  fp16  [num_groups, out_features]
    g_idx   int32 [in_features]                         group of each input channel
    W[:, i] = (q[i] - zero[g_idx[i]]) * scale[g_idx[i]]

Zero-point convention: the v1 format ("checkpoint_format": "gptq") that AutoGPTQ writes and exllamav2
and vLLM read: qzeros stores `zero - 1`. A stored 15 decodes to 16 in AutoGPTQ's torch path but to 0
in exllamav2's `(z + 1) & 0x0F`, and zero = 0 cannot be stored at all (AutoGPTQ wraps the -1 into
every nibble of the int32), so `quantize_rtn` only emits zeros in [1, maxq]: an asymmetric group
whose zero rounds to 0 gets its scale widened to max / (maxq - 1) with zero = 1.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from loraplex.engine.weights import iter_safetensors

SUPPORTED_BITS = (4, 8)
TENSOR_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # <prefix>.<suffix> of one quantized linear
QUANTIZED_WEIGHT = re.compile(r"^model\.layers\.(\d+)\..*_proj\.weight$")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIPPED_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def pack_int(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integers in [0, 2**bits) -> int32, 32 // bits consecutive values along `dim` per int32, low bits first."""
    pack = _check_bits(bits)
    v = values.to(torch.int64).movedim(dim, -1)  # [..., n]
    if v.shape[-1] % pack:
        raise ValueError(f"dimension {dim} has size {v.shape[-1]}, not a multiple of {pack} (bits={bits})")
    v = v.reshape(*v.shape[:-1], v.shape[-1] // pack, pack)  # [..., n // pack, pack]
    shifts = torch.arange(0, 32, bits, device=v.device, dtype=torch.int64)  # [pack]
    word = ((v & (2**bits - 1)) << shifts).sum(-1)  # [..., n // pack], in [0, 2**32)
    word = torch.where(word >= 2**31, word - 2**32, word)  # reinterpret as signed int32
    return word.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_int`: int32 -> int32 values in [0, 2**bits), `dim` grown 32 // bits times."""
    _check_bits(bits)
    p = packed.to(torch.int32).movedim(dim, -1)  # [..., m]
    shifts = torch.arange(0, 32, bits, device=p.device, dtype=torch.int32)  # [pack]
    v = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., m, pack]; arithmetic shift, then masked
    v = v.reshape(*p.shape[:-1], -1)  # [..., m * pack]
    return v.movedim(-1, dim).contiguous()


def default_g_idx(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """[in_features] int32: channel i in group i // group_size (desc_act=False); -1 = one group."""
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // size).to(torch.int32)


def _fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Positive float32 -> the smallest fp16 >= x, so a stored scale never shrinks the covered range."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # range shrink factors tried by clip_search


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True,
                 desc_act: bool = False, importance: torch.Tensor | None = None,
                 clip_search: bool = False) -> dict[str, torch.Tensor]:
    """Round-to-nearest GPTQ quantization of `weight` [out, in] -> {qweight, qzeros, scales, g_idx}.

    desc_act orders input channels by `importance` [in] (default: the weight's column norms),
    descending, and forms groups in that order; qweight keeps the original channel order.
    clip_search: per group, shrink the range by the factor in CLIP_GRID that gives the least squared
    error (GPTQ's quantizer with mse=True): outliers get clipped, everything else rounds finer."""
    pack = _check_bits(bits)
    out_features, in_features = weight.shape
    if in_features % pack or out_features % pack:
        raise ValueError(f"in_features {in_features} and out_features {out_features} must be multiples of {pack}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    maxq = 2**bits - 1
    w = weight.detach().float()  # [out, in]
    size = in_features if group_size == -1 else group_size
    if desc_act:
        imp = w.norm(dim=0) if importance is None else importance.float().to(w.device)  # [in]
        perm = torch.argsort(imp, descending=True, stable=True)  # channels, most important first
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(in_features, device=w.device)  # position of each channel in that order
        g_idx = (rank // size).to(torch.int32)
    else:
        g_idx = default_g_idx(in_features, group_size, w.device)
    num_groups = -(-in_features // size)
    idx = g_idx.long().expand(out_features, -1)  # [out, in]
    empty = torch.zeros(out_features, num_groups, device=w.device)  # include_self keeps 0 in the range, as GPTQ
    xmin = empty.scatter_reduce(1, idx, w, "amin")  # [out, groups], <= 0
    xmax = empty.scatter_reduce(1, idx, w, "amax")  # [out, groups], >= 0
    scale, zero = _scale_zero(xmin, xmax, maxq, sym)
    s, z = scale.float().gather(1, idx), zero.gather(1, idx)  # [out, in]
    q = torch.clamp(torch.round(w / s) + z, 0, maxq)  # [out, in]
    if clip_search:
        best = empty.scatter_add(1, idx, ((q - z) * s - w).square())  # [out, groups] squared error
        for shrink in CLIP_GRID[1:]:
            c_scale, c_zero = _scale_zero(xmin * shrink, xmax * shrink, maxq, sym)
            cs, cz = c_scale.float().gather(1, idx), c_zero.gather(1, idx)
            cq = torch.clamp(torch.round(w / cs) + cz, 0, maxq)
            err = empty.scatter_add(1, idx, ((cq - cz) * cs - w).square())
            better = err < best  # [out, groups]
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, c_scale, scale), torch.where(better, c_zero, zero)
            q = torch.where(better.gather(1, idx), cq, q)
    q = q.to(torch.int32)
    return {
        "qweight": pack_int(q.t(), bits, dim=0),  # [in // pack, out]
        "qzeros": pack_int(zero.t().to(torch.int32) - 1, bits, dim=1),  # [groups, out // pack], v1: zero - 1
        "scales": scale.t().contiguous(),  # [groups, out] fp16
        "g_idx": g_idx.contiguous(),  # [in]
    }


def _scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group fp16 scale and integer zero point for the range [xmin, xmax] (which includes 0)."""
    if sym:
        absmax = torch.maximum(-xmin, xmax)
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        return _fp16_round_up(2 * absmax / maxq), torch.full_like(xmin, (maxq + 1) // 2)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = _fp16_round_up((xmax - xmin) / maxq)
    zero = torch.round(-xmin / scale.float())
    widen = zero == 0  # not storable in the v1 format (stored zero - 1 = -1): fit [min, max] with zero 1
    scale = torch.where(widen, _fp16_round_up(xmax / (maxq - 1)), scale)
    return scale, torch.where(widen, torch.ones_like(zero), zero).clamp(1, maxq)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GPTQ v1 tensors -> weight [out, in]: W[:, i] = (q[i] - zero[g_idx[i]]) * scale[g_idx[i]], in fp32 then cast."""
    q = unpack_int(qweight, bits, dim=0)  # [in, out]
    zeros = unpack_int(qzeros, bits, dim=1) + 1  # [groups, out]; v1 stores zero - 1
    g = g_idx.long()
    w = (q - zeros[g]).float() * scales[g].float()  # [in, out]
    return w.t().to(dtype)  # [out, in]


def gptq_param_names(prefix: str, bias: bool = False) -> list[str]:
    """Checkpoint tensor names of one GPTQ linear, e.g. prefix "model.layers.0.self_attn.q_proj"."""
    return [f"{prefix}.{n}" for n in (*TENSOR_SUFFIXES, *(("bias",) if bias else ()))]


class GPTQLinear(nn.Module):
    """y = x @ dequantize(...).T + b, in x's dtype. The plain-torch reference the CUDA kernels are checked against.
    Nothing is cached; gradients flow to x only (the quantized tensors are buffers)."""

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                 bits: int, group_size: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        pack = _check_bits(bits)
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = qweight.shape[0] * pack, qweight.shape[1]
        num_groups = scales.shape[0]
        expected = {"qzeros": (num_groups, self.out_features // pack), "scales": (num_groups, self.out_features),
                    "g_idx": (self.in_features,)}
        for name, tensor in (("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"GPTQ {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"GPTQ bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.register_buffer("qweight", qweight.to(torch.int32))
        self.register_buffer("qzeros", qzeros.to(torch.int32))
        self.register_buffer("scales", scales.to(torch.float16))
        self.register_buffer("g_idx", g_idx.to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = True,
                    desc_act: bool = False) -> GPTQLinear:
        tensors = quantize_rtn(linear.weight, bits, group_size, sym, desc_act)
        return cls(**tensors, bits=bits, group_size=group_size, bias=linear.bias)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], bits: int, group_size: int,
                     bias: torch.Tensor | None = None) -> GPTQLinear:
        """From checkpoint tensors keyed qweight/qzeros/scales/g_idx (g_idx optional: some exporters omit it
        when desc_act=False)."""
        missing = {"qweight", "qzeros", "scales"} - set(tensors)
        if missing:
            raise ValueError(f"GPTQ tensors lack {sorted(missing)}")
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            g_idx = default_g_idx(tensors["qweight"].shape[0] * (32 // bits), group_size, tensors["qweight"].device)
        return cls(tensors["qweight"], tensors["qzeros"], tensors["scales"], g_idx, bits, group_size, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [out, in]
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    @property
    def weight_bytes(self) -> int:
        """Bytes of qweight + qzeros + scales + g_idx (bias not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales, self.g_idx))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def quantization_config(bits: int, group_size: int, desc_act: bool, sym: bool, lm_head: bool = False) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "lm_head": lm_head, "checkpoint_format": "gptq"}


def export_gptq(model_dir: str | Path, out_dir: str | Path, bits: int = 4, group_size: int = 128, sym: bool = True,
                desc_act: bool = False, skip: tuple[str, ...] = (), lm_head: bool = False,
                progress: Callable[[str], None] | None = None, clip_search: bool = False) -> Path:
    """Quantize every decoder-layer `*_proj.weight` of a Hugging Face folder with RTN and write a GPTQ folder
    (model.safetensors, config.json with quantization_config, quantize_config.json, tokenizer and other files).
    Names containing any string in `skip` stay unquantized; embeddings and norms are copied as is. The output head
    too, unless `lm_head` (GPTQModel's lm_head=True: quantized like the layers; a head tied to the embedding is
    written as its own lm_head and the config says untied).
    `progress` gets one line per decoder layer; clip_search picks each group's range by least squared
    error (see quantize_rtn). Returns out_dir."""
    _check_bits(bits)

    def quantize(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if not (QUANTIZED_WEIGHT.match(name) or (lm_head and name == "lm_head.weight")) or any(s in name for s in skip):
            return None
        return quantize_rtn(tensor, bits, group_size, sym, desc_act, clip_search=clip_search)

    qconfig = quantization_config(bits, group_size, desc_act, sym, lm_head=lm_head)
    out_dir = export_quantized(model_dir, out_dir, quantize, lambda: qconfig, progress, untie_head=lm_head)
    (out_dir / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")  # read by AutoGPTQ
    return out_dir


def export_quantized(model_dir: str | Path, out_dir: str | Path,
                     quantize: Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None],
                     make_qconfig: Callable[[], dict], progress: Callable[[str], None] | None = None,
                     untie_head: bool = False) -> Path:
    """The folder writing shared by the GPTQ and EXL2 exporters. `quantize(name, weight)` returns the tensors that
    replace a linear's weight, keyed by suffix (qweight, ...), or None to copy the tensor as is; a quantized
    linear's bias is stored in fp16. config.json's quantization_config is `make_qconfig()` (asked once the weights are
    written); tokenizer, chat template and other non-weight files are copied. `progress` gets one line per
    decoder layer (and one per other quantized linear). With `untie_head`, a head tied to the embedding is written as
    its own lm_head.weight (a copy of the embedding, offered to `quantize`) and config.json says untied. Returns
    out_dir."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()  # prefixes of the quantized linears
    quantized_in_layer: dict[int, list[str]] = {}
    current: int | None = None

    def report(layer: int) -> None:
        if progress is not None:
            progress(f"layer {layer + 1}/{config.get('num_hidden_layers', '?')}: quantized "
                     f"{', '.join(quantized_in_layer[layer])}")

    untie = untie_head and bool(config.get("tie_word_embeddings"))
    if untie:
        config = {**config, "tie_word_embeddings": False}

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_safetensors(model_dir):
            if untie and name == "lm_head.weight":
                continue  # a tied checkpoint's own copy (ignored by loaders): the embedding's is written instead
            yield name, tensor
            if untie and name == "model.embed_tokens.weight":
                yield "lm_head.weight", tensor

    for name, tensor in weights():
        q = quantize(name, tensor) if name.endswith(".weight") else None
        if q is None:
            tensors[name] = tensor.contiguous()
            continue
        prefix = name.removesuffix(".weight")
        tensors.update({f"{prefix}.{k}": v for k, v in q.items()})
        quantized.add(prefix)
        m = QUANTIZED_WEIGHT.match(name)
        if m is None:
            if progress is not None:
                progress(f"{prefix}: quantized")
            continue
        layer = int(m.group(1))
        if current is not None and layer != current:
            report(current)
        current = layer
        quantized_in_layer.setdefault(layer, []).append(prefix.rsplit(".", 1)[-1])
    if current is not None:
        report(current)
    for name in [n for n in tensors if n.endswith(".bias")]:  # exllamav2 reads a quantized linear's bias as fp16
        if name.removesuffix(".bias") in quantized:
            tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    qconfig = make_qconfig()
    (out_dir / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}, indent=2) + "\n")
    for path in model_dir.iterdir():  # tokenizer, chat template, generation config, ...
        if path.is_file() and path.name not in SKIPPED_FILES and not path.name.endswith(WEIGHT_FILE_SUFFIXES) \
                and path.name != "quantize_config.json":
            shutil.copy2(path, out_dir / path.name)
    return out_dir
