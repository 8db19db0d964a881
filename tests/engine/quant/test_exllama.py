"""exllamav2's CUDA kernels for GPTQ 4-bit linears against the plain-torch GPTQLinear reference (cuda only;
EXL2 matrices are checked in test_exl2.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraplex.engine.quant.gptq import GPTQLinear, export_gptq
from tests.engine.test_cuda import tiny_model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def ext():
    pytest.importorskip("exllamav2")
    from loraplex.engine.quant.exllama import exllama_ext
    ext = exllama_ext()
    if ext is None:
        pytest.skip("exllamav2's extension did not build here")
    return ext


@pytest.mark.parametrize("in_f,out_f,group_size,desc_act,bias", [
    (576, 1536, 64, False, False), (1536, 576, 128, True, True), (256, 96, 32, False, True),
])
def test_exllama_gptq_matches_the_reference(ext, in_f, out_f, group_size, desc_act, bias):
    from loraplex.engine.quant.exllama import ExllamaLinear, temp_dq_buffer
    torch.manual_seed(0)
    ref = GPTQLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), bits=4, group_size=group_size, sym=False,
                                 desc_act=desc_act).cuda()
    tensors = {n: b for n, b in ref.named_buffers(recurse=False) if b is not None and n != "bias"}
    fast = ExllamaLinear(ext, tensors, in_f, out_f, ref.bias, temp_dq_buffer(torch.device("cuda"), in_f * out_f))
    w = ref.dequantized_weight(torch.float32)
    assert (fast.dequantized_weight(torch.float32) - w).abs().max() <= 1e-3 * w.abs().max()
    for rows in (1, 7, 64, 300):  # small row counts run the fused kernel, large ones dequantize + cuBLAS
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.float16)
        want = F.linear(x.float(), w, None if ref.bias is None else ref.bias.float())
        got = fast(x)
        assert got.dtype == torch.float16
        assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
    x = torch.randn(5, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fast(x).float().pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_cuda_engine_runs_gptq_through_exllama(ext, tiny_model_dir, tmp_path):  # noqa: F811
    from loraplex.engine.core.sampling_params import SamplingParams
    from loraplex.engine.engine_args import EngineArgs
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.engine.quant.exllama import ExllamaLinear

    folder = export_gptq(tiny_model_dir, tmp_path / "gptq", bits=4, group_size=32, sym=False)
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder), dtype="float16", device="cuda",
                                                   quantization="gptq", max_num_seqs=4))
    assert any(isinstance(m, ExllamaLinear) for m in engine.runner.model.modules())
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.token_ids
    assert len(tokens) == 6


@pytest.mark.parametrize("in_f,out_f,bits", [(576, 192, 4), (256, 100, [6, 6, 4, 4, 4, 3, 3, 2])])
def test_exllama_exl2_module_matches_the_reference(ext, in_f, out_f, bits):
    from loraplex.engine.quant.exl2 import dequantize_exl2, quantize_exl2_rtn
    from loraplex.engine.quant.exllama import ExllamaLinear, temp_dq_buffer
    torch.manual_seed(0)
    tensors = quantize_exl2_rtn(torch.randn(out_f, in_f) * 0.05, bits, 32, perm=torch.randperm(in_f))
    bias = torch.randn(out_f) * 0.1
    w = dequantize_exl2(tensors, in_f, out_f, torch.float32).cuda()  # [out, in]
    n_pad = tensors["q_weight"].shape[1]
    fast = ExllamaLinear(ext, {k: v.cuda() for k, v in tensors.items()}, in_f, out_f, bias,
                         temp_dq_buffer(torch.device("cuda"), in_f * n_pad))
    assert (fast.dequantized_weight(torch.float32) - w).abs().max() <= 2e-3 * w.abs().max()
    for rows in (3, 200):
        x = torch.randn(rows, in_f, device="cuda", dtype=torch.float16)
        want = x.float() @ w.t() + bias.cuda()
        got = fast(x)
        assert got.shape == (rows, out_f)
        assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
