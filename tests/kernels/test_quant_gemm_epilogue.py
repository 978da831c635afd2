"""The quantized GEMM's fused SiLU * up epilogue: a quantized [gate; up] projection and its
activation in one launch, against the unfused kernel followed by `silu_mul`. On CPU through
TRITON_INTERPRET=1 (every tiling kind: the GEMVs, x pairs, word sums, the half2 GEMV, dot
tiles); on a GPU bit for bit, and through a whole int8 / int4 model, tokens unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.kernels.test_gemm_epilogues import close as close_16bit_epilogue
from tests.kernels.test_triton_quant_gemm import CUDA, SMALL_CONFIGS, device_and_check, dtypes_for, needs_triton
from thinkwise.kernels import linear_dispatch
from thinkwise.kernels import triton_quant_gemm as tq
from thinkwise.kernels.fused import gated_activation, silu_mul, silu_mul_reference
from thinkwise.kernels.linear_dispatch import DispatchLinear
from thinkwise.kernels.linear_methods.base import LinearMethod
from thinkwise.kernels.linear_methods.int4 import quantize_int4
from thinkwise.kernels.linear_methods.int8 import quantize_int8
from thinkwise.kernels.linear_methods.plans import gpu_apply_silu_mul
from thinkwise.kernels.triton_quant_gemm import QuantGemmConfig, pack_int4, triton_quant_gemm

gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# (M, N, K): N the [gate; up] rows (each half a whole number of half tiles for every config
# above), K a multiple of the int4 group and not always of block_k.
SHAPES = [(1, 64, 96), (3, 32, 128), (17, 64, 64)]


def quantized(bits: int, n: int, k: int, dtype: torch.dtype, generator, group: int = 32):
    """(codes, scales, zeros, group) of a random [n, k] weight."""
    w = torch.randn(n, k, generator=generator)
    if bits == 8:
        q, scales = quantize_int8(w, dtype)
        return q, scales, None, k
    codes, scales, zeros = quantize_int4(w, group, dtype)
    return pack_int4(codes), scales, zeros, group


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    # As the 16-bit epilogue's test, but fp32 within 1e-5: the interpreter's dot (numpy) may
    # order a tile's sums differently once its rows move (~1e-6 measured).
    return close_16bit_epilogue(got, expected, dtype, fp32_tolerance=1e-5)


@needs_triton
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("bits", [8, 4])
def test_silu_mul_epilogue_matches_gemm_then_silu_mul(config, bits):
    device = device_and_check()
    g = torch.Generator().manual_seed(bits)
    for dtype in dtypes_for(config):
        for m, n, k in SHAPES:
            if m > config.max_rows:
                continue
            assert tq.gated_fits(n, config, None)
            args = [t.to(device) if t is not None else None for t in quantized(bits, n, k, dtype, g)[:3]]
            group = k if bits == 8 else 32
            x = torch.randn(m, k, generator=g).to(dtype).to(device)
            got = triton_quant_gemm(x, *args, None, group, config, tq.EPILOGUE_SILU_MUL)
            unfused = triton_quant_gemm(x, *args, None, group, config)
            assert got.shape == (m, n // 2) and got.dtype == dtype
            if CUDA:  # the same sums, rounded where the unfused kernels round
                assert torch.equal(got, silu_mul(unfused)), (config.name, dtype, m)
            else:
                assert close(got, silu_mul_reference(unfused), dtype), (config.name, dtype, m)
            # Not the plain GEMM's first half (gate rows paired with the wrong up rows fail too).
            assert not close(got, unfused[:, : n // 2], dtype)


def test_which_tilings_can_fuse_and_the_error_for_one_that_cannot():
    gemv = QuantGemmConfig(block_n=16, block_k=64, use_dot=False, max_rows=4)
    assert tq.gated_fits(64, gemv, None) and tq.gated_fits(28672, tq.DEFAULT_CONFIGS[0], None)
    assert not tq.gated_fits(40, gemv, None)  # 20 gate rows do not split into 8-row half tiles
    assert not tq.gated_fits(63, gemv, None)
    assert not tq.gated_fits(64, gemv, torch.zeros(64))  # a bias is not fused
    assert tq.gated_fits(64, QuantGemmConfig(block_n=16, block_k=64, split_k=4), None)  # after the in-kernel sum
    if tq.HAVE_TRITON:
        q, scales = quantize_int8(torch.randn(40, 64), torch.float32)
        with pytest.raises(ValueError, match="cannot fuse SiLU"):
            triton_quant_gemm(torch.randn(1, 64), q, scales, None, None, 64, gemv, tq.EPILOGUE_SILU_MUL)


@needs_triton
def test_the_plan_decides_whether_the_fused_kernel_runs(monkeypatch):
    """`gpu_apply_silu_mul` fuses where the table picked a tiling (a GEMV, a split-K dot tile);
    dequantize-then-cuBLAS rows and a biased layer come back None (the caller unfuses)."""
    device = device_and_check()
    g = torch.Generator().manual_seed(5)
    q, scales, _, _ = quantized(8, 64, 64, torch.float32, g)
    q, scales = q.to(device), scales.to(device)
    gemv = QuantGemmConfig(block_n=16, block_k=64, use_dot=False, max_rows=4)
    split = QuantGemmConfig(block_n=16, block_k=32, split_k=2)
    layer = SimpleNamespace(in_features=64, out_features=64, bias=None,
                            quant_plan=(None, gemv, split), quant_plan_above=[(None, None)])
    launched = []
    real = tq.triton_quant_gemm
    monkeypatch.setattr(tq, "triton_quant_gemm", lambda *a, **kw: launched.append(a[7]) or real(*a, **kw))
    x = torch.randn(1, 64, generator=g).to(device)
    fused = gpu_apply_silu_mul(layer, x, q, scales, None, 64)
    assert fused is not None and fused.shape == (1, 32) and launched == [tq.EPILOGUE_SILU_MUL]
    assert torch.allclose(fused.cpu(), silu_mul_reference(real(x, q, scales, None, None, 64, gemv)).cpu(), atol=1e-6)
    x2 = torch.randn(2, 64, generator=g).to(device)
    fused = gpu_apply_silu_mul(layer, x2, q, scales, None, 64)  # split-K: summed in the kernel, then fused
    assert torch.allclose(fused.cpu(), silu_mul_reference(real(x2, q, scales, None, None, 64, split)).cpu(), atol=1e-5)
    assert gpu_apply_silu_mul(layer, torch.randn(3, 64).to(device), q, scales, None, 64) is None  # cuBLAS
    biased = SimpleNamespace(**{**vars(layer), "bias": torch.zeros(64, device=device)})
    assert gpu_apply_silu_mul(biased, x, q, scales, None, 64) is None
    assert launched == [tq.EPILOGUE_SILU_MUL] * 2


class FusingMethod(LinearMethod):
    """A method whose fused answer is recognisable (and None on request)."""

    name = "fake"

    def __init__(self, fused: torch.Tensor | None):
        self.fused, self.asked = fused, 0

    def apply(self, layer, x):
        return x.repeat(1, 2)

    def apply_silu_mul(self, layer, x):
        self.asked += 1
        return self.fused


def test_forward_gated_asks_the_method_first_and_honours_the_switch():
    layer = DispatchLinear(8, 16, bias=False)
    x = torch.randn(2, 8)
    marker = torch.full((2, 8), 7.0)
    layer.method = FusingMethod(marker)
    assert layer.forward_gated(x, "silu") is marker
    layer.method = FusingMethod(None)  # the method cannot fuse: GEMM, then the element-wise kernel
    assert torch.equal(layer.forward_gated(x, "silu"), silu_mul(layer(x))) and layer.method.asked == 1
    layer.method = FusingMethod(marker)
    assert torch.equal(layer.forward_gated(x, "gelu_tanh"), gated_activation(layer(x), "gelu_tanh"))
    linear_dispatch.set_epilogue_fusion(False)  # THINKWISE_GEMM_EPILOGUE=0
    try:
        assert torch.equal(layer.forward_gated(x, "silu"), silu_mul(layer(x)))
    finally:
        linear_dispatch.set_epilogue_fusion(True)
    assert layer.method.asked == 0


# ----------------------------------------------------------------------------- GPU


@gpu_only
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(6144, 1024), (28672, 4096)], ids=["qwen3-0.6b", "llama-3-8b"])
def test_fused_epilogue_on_gpu_real_shapes_every_default_tiling(shape, bits):
    n, k = shape
    g = torch.Generator().manual_seed(n + bits)
    q, scales, zeros, group = quantized(bits, n, k, torch.bfloat16, g, group=128)
    q, scales = q.cuda(), scales.cuda()
    zeros = zeros.cuda() if zeros is not None else None
    for rows in (1, 2, 4, 16, 64):
        x = torch.randn(rows, k, generator=g).bfloat16().cuda()
        for config in tq.DEFAULT_CONFIGS:
            if rows > config.max_rows or not tq.gated_fits(n, config, None) or \
                    ((config.half2 or config.bf16_pairs) and zeros is None):
                continue
            got = triton_quant_gemm(x, q, scales, zeros, None, group, config, tq.EPILOGUE_SILU_MUL)
            assert torch.equal(got, silu_mul(triton_quant_gemm(x, q, scales, zeros, None, group, config))), \
                (config.name, rows)


@gpu_only
@pytest.mark.parametrize("quantization", ["int8", "int4-all"])
def test_quantized_model_tokens_with_and_without_the_fused_epilogue(monkeypatch, tiny_llama, quantization):
    """A tiny quantized model whose layers follow a Triton plan (GEMV tiles up to 4 rows, dot
    tiles above): the same greedy tokens with the fused epilogue as without, graphs on and off,
    and the fused launches really ran."""
    from thinkwise import LLM, SamplingParams

    directory, _ = tiny_llama
    prompts = [[256, 5, 9, 77, 31, 2, 200], [256] + list(range(30, 60)), [256, 1, 2, 3]]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    gemv = QuantGemmConfig(block_n=16, block_k=64, use_dot=False, max_rows=4)
    dot = QuantGemmConfig(block_n=16, block_k=64)
    launched = []
    real = tq.triton_quant_gemm
    monkeypatch.setattr(tq, "triton_quant_gemm", lambda *a, **kw: launched.append(a[7:]) or real(*a, **kw))

    def run(cuda_graphs: bool) -> list[list[int]]:
        llm = LLM(str(directory), device="cuda", dtype="bfloat16", block_size=4, num_kv_blocks=512,
                  cuda_graphs=cuda_graphs, quantization=quantization)
        for layer in llm.engine.runner.model.modules():  # graphs are captured lazily: after the plans
            if isinstance(layer, DispatchLinear) and layer.method is not None:
                layer.quant_plan = (None, gemv, gemv, gemv, gemv)
                layer.quant_plan_above = [(None, dot)]
        return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]

    for cuda_graphs in (True, False):
        monkeypatch.setenv("THINKWISE_GEMM_EPILOGUE", "0")
        expected = run(cuda_graphs)
        assert not any(tq.EPILOGUE_SILU_MUL in args for args in launched)
        monkeypatch.setenv("THINKWISE_GEMM_EPILOGUE", "1")
        assert run(cuda_graphs) == expected, cuda_graphs
        assert any(tq.EPILOGUE_SILU_MUL in args for args in launched)
        launched.clear()
