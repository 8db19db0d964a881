"""The CPU int4 kernel path for GPTQ 4-bit linears against the plain-torch GPTQLinear reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.quant import use_quantized_kernels
from loraplex.engine.quant.gptq import GPTQLinear, export_gptq
from loraplex.engine.quant.int4_cpu import Int4CPULinear, can_use_cpu_int4, has_cpu_int4_kernel
from tests.engine.test_cuda import tiny_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(not has_cpu_int4_kernel(), reason="this torch build has no CPU int4 kernel")
CPU = torch.device("cpu")


def reference(in_f: int, out_f: int, group_size: int, desc_act: bool, bias: bool, seed: int = 0) -> GPTQLinear:
    torch.manual_seed(seed)
    return GPTQLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), bits=4, group_size=group_size, sym=False,
                                  desc_act=desc_act)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,out_f,group_size,desc_act,bias", [
    (64, 96, 32, False, True), (576, 192, 64, False, False), (256, 48, 128, True, True), (96, 32, 32, True, False),
])
def test_int4_linear_matches_the_reference(dtype, in_f, out_f, group_size, desc_act, bias):
    ref = reference(in_f, out_f, group_size, desc_act, bias)
    fast = Int4CPULinear(ref, dtype)
    assert (fast.perm is not None) == desc_act
    for rows in (1, 5, 33):
        x = torch.randn(rows, in_f).to(dtype)
        want = F.linear(x.float(), ref.dequantized_weight(torch.float32),
                        None if ref.bias is None else ref.bias.float())
        got = fast(x)
        assert got.dtype == dtype and got.shape == (rows, out_f)
        # the kernel rounds scales and zeros to the activation dtype and accumulates in it
        tol = (2e-2 if dtype == torch.bfloat16 else 4e-3) * want.abs().max()
        assert (got.float() - want).abs().max() <= tol
    w_ref = ref.dequantized_weight(torch.float32)
    w_fast = fast.dequantized_weight(torch.float32)
    assert (w_fast - w_ref).abs().max() <= 2**-7 * w_ref.abs().max()


def test_batched_leading_dims_and_bytes():
    ref = reference(128, 64, 32, False, False)
    fast = Int4CPULinear(ref, torch.bfloat16)
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    assert torch.equal(fast(x), fast(x.reshape(6, 128)).reshape(2, 3, 64))
    # one 4-bit copy of the weight (the reference's qweight is not kept) plus scales and zeros
    assert fast.weight_bytes == 128 * 64 // 2 + (128 // 32) * 64 * 2 * 2
    assert not hasattr(fast, "qweight")


def test_gradients_reach_the_input_through_the_reference_path():
    ref = reference(64, 96, 32, True, True)
    fast = Int4CPULinear(ref, torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    lora_a = nn.Parameter(torch.randn(8, 64, dtype=torch.bfloat16) * 0.1)
    y = fast(x) + x @ lora_a.t() @ torch.ones(8, 96, dtype=torch.bfloat16)
    y.float().pow(2).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
    assert all(b.grad is None for b in fast.buffers())
    x2 = x.detach().float().requires_grad_()
    F.linear(x2, ref.dequantized_weight(), ref.bias.float()).pow(2).mean().backward()  # same loss, no LoRA
    x3 = x.detach().clone().requires_grad_()
    fast(x3).float().pow(2).mean().backward()
    assert (x3.grad.float() - x2.grad).abs().max() <= 3e-2 * x2.grad.abs().max()


def test_which_linears_can_use_the_kernel():
    assert can_use_cpu_int4(reference(64, 32, 32, False, False), torch.bfloat16)
    assert not can_use_cpu_int4(reference(64, 32, 32, False, False), torch.float32)  # no fast fp32 kernel
    torch.manual_seed(0)
    eight_bit = GPTQLinear.from_linear(nn.Linear(64, 32), bits=8, group_size=32)
    assert not can_use_cpu_int4(eight_bit, torch.bfloat16)
    assert not can_use_cpu_int4(GPTQLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=16), torch.bfloat16)
    assert not can_use_cpu_int4(reference(64, 40, 32, False, False), torch.bfloat16)  # out_features % 16
    with pytest.raises(ValueError, match="cannot use the CPU int4 kernel"):
        Int4CPULinear(eight_bit, torch.bfloat16)


def test_engine_swaps_in_the_kernel_for_bf16_gptq(tiny_model_dir, tmp_path):  # noqa: F811
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.loader import load_model

    folder = export_gptq(tiny_model_dir, tmp_path / "gptq", bits=4, group_size=32, sym=False)
    # the swapped model's logits against the reference model's, same bf16 weights
    ref_model, config = load_model(folder, torch.bfloat16)
    fast_model, _ = load_model(folder, torch.bfloat16)
    assert use_quantized_kernels(fast_model, CPU, torch.bfloat16) == "torch int4 (CPU)"
    assert not any(type(m) is GPTQLinear for m in fast_model.modules())
    assert use_quantized_kernels(ref_model, CPU, torch.float32) is None  # fp32: the references stay
    from tests.engine.test_models import PagedRunner
    ids = list(range(3, 40))
    want = PagedRunner(ref_model, config, block_size=16, num_blocks=8).run({"t": ids}, [[("t", len(ids))]])["t"]
    got = PagedRunner(fast_model, config, block_size=16, num_blocks=8).run({"t": ids}, [[("t", len(ids))]])["t"]
    assert (got.float() - want.float()).abs().max() <= 5e-2 * want.float().abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9

    # by default the engine streams GPTQ weights (engine/quant/stream.py); --cpu-linear onednn keeps this kernel
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder), dtype="bfloat16", quantization="gptq",
                                                   max_num_seqs=4, cpu_linear="onednn"))
    assert any(isinstance(m, Int4CPULinear) for m in engine.runner.model.modules())
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.token_ids
    assert len(tokens) == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,out_f,group_size,permute,bias", [
    (64, 96, 32, False, True), (256, 48, 64, True, False), (576, 192, 32, True, True),
])
def test_int4_linear_matches_the_exl2_reference(dtype, in_f, out_f, group_size, permute, bias):
    from loraplex.engine.quant.exl2 import EXL2Linear
    torch.manual_seed(1)
    perm = torch.randperm(in_f) if permute else None
    ref = EXL2Linear.from_linear(nn.Linear(in_f, out_f, bias=bias), bits=4, group_size=group_size, perm=perm)
    assert can_use_cpu_int4(ref, dtype)
    fast = Int4CPULinear(ref, dtype)
    assert (fast.perm is not None) == permute
    x = torch.randn(9, in_f).to(dtype)
    want = F.linear(x.float(), ref.dequantized_weight(torch.float32), None if ref.bias is None else ref.bias.float())
    got = fast(x)
    assert got.shape == (9, out_f)
    assert (got.float() - want).abs().max() <= (2e-2 if dtype == torch.bfloat16 else 4e-3) * want.abs().max()
    w_ref = ref.dequantized_weight(torch.float32)
    assert (fast.dequantized_weight(torch.float32) - w_ref).abs().max() <= 2**-7 * w_ref.abs().max()


def test_mixed_bit_exl2_keeps_the_reference():
    from loraplex.engine.quant.exl2 import EXL2Linear
    torch.manual_seed(0)
    mixed = EXL2Linear.from_linear(nn.Linear(128, 64), bits=[6, 4, 4, 3], group_size=32)
    assert not can_use_cpu_int4(mixed, torch.bfloat16)
