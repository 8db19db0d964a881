"""Llama-family decoder (Llama 1-3, SmolLM, Mistral, Qwen2 via subclasses) over a flattened, paged batch.

References: Hugging Face transformers' modeling_llama.py (numerics matched: RMSNorm in fp32, rotary
cos/sin in fp32 then cast), nano-vllm's qwen3.py (flattened tokens, paged attention). The elementwise
pieces live in engine/layers/elementwise.py (plain torch, or fused CPU kernels for inference).
Every projection is a separate named nn.Linear so LoRA and quantization can swap it for a wrapper.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from loraplex.engine.core.config import ModelConfig
from loraplex.engine.kernels import cpu_kernels
from loraplex.engine.layers.attention import attend
from loraplex.engine.layers.elementwise import (
    add_rms_norm,
    apply_rotary,
    rms_norm,
    rms_norm_takes_kernel,
    silu_and_mul,
)
from loraplex.engine.layers.forward_batch import (
    AttentionMetadata,
    ForwardBatch,
    KVCache,
)
from loraplex.engine.layers.fused_layer import (
    register_module_forwards,
    try_fused_layer,
    try_fused_stack,
)

# Checkpoint (Hugging Face layout) name -> our parameter name; "{i}" is the layer index. Identity
# today; kept explicit so a renamed checkpoint or a fused layout only changes this table.
WEIGHT_NAME_TABLE: dict[str, str] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",  # [vocab, hidden]
    "model.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",  # [hidden]
    "model.layers.{i}.self_attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",  # [heads*hd, hidden]
    "model.layers.{i}.self_attn.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",  # [heads*hd]
    "model.layers.{i}.self_attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",  # [kv_heads*hd, hidden]
    "model.layers.{i}.self_attn.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",  # [kv_heads*hd]
    "model.layers.{i}.self_attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",  # [kv_heads*hd, hidden]
    "model.layers.{i}.self_attn.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",  # [kv_heads*hd]
    "model.layers.{i}.self_attn.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",  # [hidden, heads*hd]
    "model.layers.{i}.self_attn.o_proj.bias": "model.layers.{i}.self_attn.o_proj.bias",  # [hidden]
    "model.layers.{i}.post_attention_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",  # [inter, hidden]
    "model.layers.{i}.mlp.gate_proj.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "model.layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",  # [inter, hidden]
    "model.layers.{i}.mlp.up_proj.bias": "model.layers.{i}.mlp.up_proj.bias",
    "model.layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",  # [hidden, inter]
    "model.layers.{i}.mlp.down_proj.bias": "model.layers.{i}.mlp.down_proj.bias",
    "model.norm.weight": "model.norm.weight",  # [hidden]
    "lm_head.weight": "lm_head.weight",  # [vocab, hidden]; absent or ignored when tied
}
IGNORED_CHECKPOINT_WEIGHTS = re.compile(r".*rotary_emb\.inv_freq$")  # old checkpoints; recomputed here
_LAYER = re.compile(r"\.(\d+)\.")


def map_checkpoint_name(name: str) -> str | None:
    """Our parameter name for a checkpoint weight name, or None if it is to be ignored."""
    if IGNORED_CHECKPOINT_WEIGHTS.match(name):
        return None
    m = _LAYER.search(name)
    key = name if m is None else name[:m.start()] + ".{i}." + name[m.end():]
    target = WEIGHT_NAME_TABLE.get(key)
    if target is None:
        raise KeyError(f"unexpected checkpoint weight {name!r}")
    return target if m is None else target.replace("{i}", m.group(1))


class Dropped(nn.Module):
    """In place of a part of the model this process does not hold (a pipeline stage: engine/loader.py ModelParts)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} is held by another pipeline stage")

    def extra_repr(self) -> str:
        return self.name


class RMSNorm(nn.Module):
    float32_kernels = False  # take the fused kernels in float32 too (LlamaForCausalLM.use_float32_kernels)

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        return rms_norm(x, self.weight, self.eps, self.float32_kernels)

    def kernel_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The weight when forward(x) would be the rms_norm kernel exactly (for a caller that runs that kernel itself:
        the decoder stack folds the final norm in), else None. A norm computed another way must override this."""
        if type(self).forward is not RMSNorm.forward or not rms_norm_takes_kernel(x, self.weight, self.float32_kernels):
            return None
        return self.weight if self.weight.is_contiguous() else None


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, with linear or llama3 rope scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, llama3)")


MAX_ROTARY_TABLE = 1 << 16  # positions a cos/sin table covers at most (2 x 32 MiB at head_dim 128, float32)


class RotaryEmbedding(nn.Module):
    """cos and sin [num_tokens, 1, head_dim] of each token's position, in the step's dtype. Read from tables of every
    position so far (per dtype and device, grown by doubling), which hold exactly what `compute` gives for those
    positions: a step gathers its rows in two operations instead of computing them in ten (~0.1 ms of a batch-1
    decode step on CPU)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # float32 on purpose; built on CPU even under a meta-device context (the loader moves it)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(1) * self.inv_freq.float().unsqueeze(0)  # [num_tokens, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [num_tokens, 1, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def cpu_tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The CPU cos / sin tables [positions, head_dim] built for `dtype`, or None (not built yet, or not on CPU)."""
        return self._tables.get((dtype, torch.device("cpu")))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, self.inv_freq.device)
        if key[1].type != "cpu":  # an index past a table asserts on the device instead of raising here
            return self.compute(positions, dtype)
        tables = self._tables.get(key)
        if tables is not None and positions.device == key[1]:
            try:
                cos, sin = tables[0].index_select(0, positions), tables[1].index_select(0, positions)
                return cos.unsqueeze(1), sin.unsqueeze(1)
            except IndexError:  # a position past the tables: grow them
                pass
        if positions.device != key[1] or positions.numel() == 0:
            return self.compute(positions, dtype)
        have = 0 if tables is None else tables[0].shape[0]
        need = int(positions.max()) + 1
        if need > MAX_ROTARY_TABLE or int(positions.min()) < 0:  # no table for these
            return self.compute(positions, dtype)
        size = min(max(need, 2 * have, 4096), MAX_ROTARY_TABLE)
        cos, sin = self.compute(torch.arange(size, device=key[1]), dtype)
        self._tables[key] = (cos[:, 0], sin[:, 0])
        return self.forward(positions, dtype)


class LlamaAttention(nn.Module):
    float32_kernels = False

    def __init__(self, config: ModelConfig, o_proj_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads,
                                                            config.num_key_value_heads, config.head_dim)
        self.scale = self.head_dim ** -0.5
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=o_proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None,
                slot_mapping: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)  # [num_tokens, heads, head_dim]
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [num_tokens, kv_heads, head_dim]
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        f32 = self.float32_kernels
        q, k = apply_rotary(q, cos, sin, f32), apply_rotary(k, cos, sin, f32)
        o = attend(q, k, v, kv_cache, slot_mapping, attn, self.scale)  # [num_tokens, heads, head_dim]
        return self.o_proj(o.view(n, self.num_heads * self.head_dim))  # [num_tokens, hidden]


class LlamaMLP(nn.Module):
    float32_kernels = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, inter, bias=bias)
        self.up_proj = nn.Linear(h, inter, bias=bias)
        self.down_proj = nn.Linear(inter, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x), self.float32_kernels))


class LlamaDecoderLayer(nn.Module):
    float32_kernels = False

    def __init__(self, config: ModelConfig, o_proj_bias: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, o_proj_bias)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None,
                batch: ForwardBatch) -> torch.Tensor:
        fused = try_fused_layer(self, x, cos, sin, kv_cache, batch)  # the same result in one kernel call, when it can
        if fused is not None:
            return fused
        a = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, batch.slot_mapping, batch.attn)
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x, a, norm.weight, norm.eps, self.float32_kernels)  # x + a, and its norm, in one pass
        return x + self.mlp(h)


register_module_forwards(LlamaAttention.forward, LlamaMLP.forward)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, o_proj_bias: bool) -> None:
        super().__init__()
        # built on the meta device and read from the checkpoint (loader.load_model): no random init, whose normal_ on
        # meta tensors imports torch._dynamo (0.5-1.2 s of every engine start)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, o_proj_bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def step_inputs(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [num_tokens, hidden] (the tokens' embeddings) and cos, sin [num_tokens, 1, head_dim] (their positions'
        rotary rows): through one kernel call where the embedding is the plain table and the rotary tables are built
        (the same rows the modules gather: after a step's weights went through the caches each tensor operation
        costs ~10 us, and these were five), else through the modules."""
        embed, ids, positions = self.embed_tokens, batch.input_ids, batch.positions
        weight = getattr(embed, "weight", None)
        if cpu_kernels.loaded() and type(embed) is nn.Embedding and embed.max_norm is None \
                and not weight.requires_grad and weight.is_contiguous() and weight.device.type == "cpu" \
                and weight.dtype in (torch.float32, torch.bfloat16) and ids.dtype == positions.dtype == torch.int64 \
                and ids.device.type == "cpu" and ids.is_contiguous() and positions.is_contiguous():
            tables = self.rotary_emb.cpu_tables(weight.dtype)
            if tables is not None:
                try:
                    return torch.ops.loraplex_cpu.step_inputs(weight, ids, *tables, positions)
                except IndexError:  # a position past the tables (the module grows them) or a bad token (it raises)
                    pass
        x = embed(ids)
        return (x, *self.rotary_emb(positions, x.dtype))

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache | None]) -> torch.Tensor:
        x, cos, sin = self.step_inputs(batch)  # cos / sin once per step, shared by all layers
        # every layer in one call when it can, the final norm included
        stacked = try_fused_stack(self.layers, x, cos, sin, kv_caches, batch, self.norm)
        if stacked is not None:
            return stacked
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, batch)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    o_proj_bias: bool | None = None  # None: follows config.attention_bias (Llama); Qwen2 overrides

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        o_bias = config.attention_bias if self.o_proj_bias is None else self.o_proj_bias
        self.model = LlamaModel(config, o_bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def use_float32_kernels(self) -> None:
        """Float32 steps take the fused elementwise kernels (and so the one-call layer) instead of the references:
        ~1e-4 from transformers' logits instead of bit-exact. For a model whose linears stream (their summation
        order already differs); per model, so another engine in the process keeps the parity mode."""
        for module in self.modules():
            if hasattr(type(module), "float32_kernels"):
                module.float32_kernels = True

    def tie_weights(self) -> None:
        """Share lm_head.weight with the embedding when the config says so (call again after loading)."""
        if self.config.tie_word_embeddings and not isinstance(self.lm_head, Dropped):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def map_checkpoint_name(name: str) -> str | None:
        return map_checkpoint_name(name)

    def forward(self, batch: ForwardBatch, kv_caches: list[KVCache | None]) -> torch.Tensor:
        """-> final hidden states [num_tokens, hidden]; select rows before compute_logits."""
        return self.model(batch, kv_caches)

    def output_head(self, rows: torch.Tensor | None = None) -> nn.Module | None:
        """The module that computes the logits of every one of `rows` (the batch rows compute_logits would get): the
        base head, or None when an adapter's own head takes some of them."""
        head = self.lm_head
        if getattr(head, "takes_rows", False):
            return head.base if head.serves_base_only(rows) else None
        return head

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[n, hidden] -> [n, vocab]. `rows`: the batch rows `hidden` holds, for an output head that differs per row
        (the adapter layer swaps in one with `takes_rows`: adapters with a head of their own)."""
        if rows is not None and getattr(self.lm_head, "takes_rows", False):
            return self.lm_head(hidden, rows)
        return self.lm_head(hidden)
