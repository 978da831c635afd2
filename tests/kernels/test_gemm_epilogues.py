"""The flat GEMM's fused SiLU-mul epilogue against the unfused kernels it replaces: on CPU
through TRITON_INTERPRET=1, on a GPU (skipped without one) on the real Qwen3-0.6B /
Llama-3-8B shapes and inside a CUDA graph, and through a whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from thinkwise.kernels import triton_gemm as tg
from thinkwise.kernels.fused import silu_mul, silu_mul_reference
from thinkwise.kernels.linear_dispatch import DispatchLinear, GpuLinearDispatcher
from thinkwise.kernels.triton_gemm import FlatGemmConfig, SplitKWorkspace
from tests.kernels.test_triton_gemm import SMALL_CONFIGS, dtypes_for, interpret_or_skip

pytestmark = pytest.mark.skipif(not tg.HAVE_TRITON, reason="triton is not installed")

CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(CUDA, reason="the GPU tests below cover CUDA")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# (M, N, K): several M tiles for the gemv (4 rows a tile), K off the block size.
SMALL_SHAPES = [(1, 64, 96), (3, 32, 80), (6, 64, 112)]


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, fp32_tolerance: float = 1e-6) -> bool:
    # fp32: the same sums. 16-bit: the interpreter casts with its own rounding, so allow a
    # rounding step on a few elements; the GPU test below asks for exact equality where it can.
    if dtype == torch.float32:
        return torch.allclose(got, expected, rtol=fp32_tolerance, atol=fp32_tolerance)
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    return torch.allclose(got.float(), expected.float(), rtol=2 * step, atol=2 * step)


@interpreter_only
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=lambda c: c.name)
def test_silu_mul_epilogue_matches_gemm_then_silu_mul(config):
    interpret_or_skip()
    g = torch.Generator().manual_seed(1)
    for dtype in dtypes_for(config):
        for m, n, k in SMALL_SHAPES:
            x = torch.randn(m, k, generator=g).to(dtype)
            w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype)
            workspace = SplitKWorkspace("cpu", *tg.workspace_size(m, n, k, config, x.device))
            got = tg.triton_flat_gemm_silu_mul(x, w, config, workspace)
            expected = silu_mul_reference(tg.triton_flat_gemm(x, w, None, config, workspace))
            assert got.shape == (m, n // 2) and got.dtype == dtype
            assert close(got, expected, dtype), (dtype, m, n, k)
            assert int(workspace.counters.abs().sum()) == 0


def test_fusion_rules_and_errors():
    gemv = SMALL_CONFIGS[0]
    assert tg.can_fuse_silu_mul(64, gemv) and tg.can_fuse_silu_mul(6144, tg.DEFAULT_CONFIGS[2])
    assert not tg.can_fuse_silu_mul(40, gemv)  # 20 gate rows do not split into 8-row half tiles
    assert not tg.can_fuse_silu_mul(63, gemv)
    x, w = torch.zeros(2, 32), torch.zeros(40, 32)
    with pytest.raises(ValueError, match="does not split"):
        tg.triton_flat_gemm_silu_mul(x, w, gemv)


@interpreter_only
@pytest.mark.parametrize("fusion", ["1", "0"])
def test_model_with_fused_epilogues_generates_the_same_tokens(monkeypatch, tiny_llama, fusion):
    """A whole model whose GEMMs follow a Triton table (so its MLPs take the fused epilogue)
    against the same model without one: the same greedy tokens, and the fused launches
    really ran (or did not, with THINKWISE_GEMM_EPILOGUE=0)."""
    interpret_or_skip()
    from thinkwise import LLM, SamplingParams

    directory, _ = tiny_llama
    prompts = [[256, 5, 9, 77, 31, 2, 200], [256, 1, 2, 3]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    common = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=64)
    expected = [o.outputs[0].token_ids for o in LLM(str(directory), **common).generate(prompts, params)]

    monkeypatch.setenv("THINKWISE_GEMM_EPILOGUE", fusion)  # read when the engine's config is built
    llm = LLM(str(directory), **common)
    model = llm.engine.runner.model
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, DispatchLinear)}
    gemv, dot = SMALL_CONFIGS[1], SMALL_CONFIGS[3]
    GpuLinearDispatcher(table={shape: [gemv, gemv, gemv, dot, dot, None, None] for shape in shapes}).apply(model)
    calls = []
    real_silu = tg.triton_flat_gemm_silu_mul

    def silu(*args, **kwargs):
        calls.append(args[2])
        return real_silu(*args, **kwargs)

    monkeypatch.setattr(tg, "triton_flat_gemm_silu_mul", silu)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == expected
    if fusion == "1":  # every decode step (5 after each prefill) runs one fused MLP activation per layer
        assert len(calls) >= 5 * model.config.num_layers and set(calls) <= {gemv, dot}
    else:
        assert calls == []


def test_dispatch_linear_without_a_table_runs_the_unfused_twin():
    torch.manual_seed(0)
    gate_up = DispatchLinear(16, 64, bias=False)
    torch.nn.init.normal_(gate_up.weight, std=0.2)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(gate_up.forward_gated(x, "silu"), silu_mul(gate_up(x)))


# ----------------------------------------------------------------------------- GPU

# Qwen3-0.6B and Llama-3-8B gate/up projections.
GPU_SHAPES = [(6144, 1024), (28672, 4096)]


@gpu_only
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=["qwen3-0.6b", "llama-3-8b"])
def test_silu_mul_epilogue_on_gpu_real_shapes_and_in_a_graph(shape):
    n, k = shape
    g = torch.Generator(device="cuda").manual_seed(n)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).bfloat16()
    configs = list(tg.DEFAULT_CONFIGS) + [FlatGemmConfig(block_n=16, block_k=512, use_dot=False, max_rows=4,
                                                         split_k=3)]
    for rows in (1, 2, 4, 16, 64):
        x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
        for config in configs:
            if rows > config.max_rows or not tg.can_fuse_silu_mul(n, config):
                continue
            ws = SplitKWorkspace("cuda", *tg.workspace_size(rows, n, k, config, x.device))
            # The same sums as the unfused GEMM, then the same rounding: bit for bit.
            got = tg.triton_flat_gemm_silu_mul(x, w, config, ws)
            assert torch.equal(got, silu_mul(tg.triton_flat_gemm(x, w, None, config, ws))), (config.name, rows)
            assert int(ws.counters.abs().sum()) == 0

    # Captured in a CUDA graph (with PDL where the GPU has it) and replayed on new inputs.
    config = FlatGemmConfig(block_n=16, block_k=512, use_dot=False, max_rows=4, split_k=2)
    static_x = torch.randn(1, k, device="cuda").bfloat16()
    ws = SplitKWorkspace("cuda", *tg.workspace_size(1, n, k, config, static_x.device))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        tg.triton_flat_gemm_silu_mul(static_x, w, config, ws)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = tg.triton_flat_gemm_silu_mul(static_x, w, config, ws)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        expected = silu_mul_reference(F.linear(static_x.float(), w.float()).bfloat16())
        assert torch.allclose(static_out.float(), expected.float(), rtol=0.02, atol=0.02)
    assert int(ws.counters.abs().sum()) == 0


@gpu_only
def test_model_tokens_with_and_without_the_fused_epilogue_on_gpu(monkeypatch, tiny_llama):
    from thinkwise import LLM, SamplingParams

    directory, _ = tiny_llama
    prompts = [[256, 5, 9, 77, 31, 2, 200], [256] + list(range(30, 60)), [256, 1, 2, 3]]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

    def run(cuda_graphs: bool) -> list[list[int]]:
        llm = LLM(str(directory), device="cuda", dtype="bfloat16", block_size=4, num_kv_blocks=512,
                  cuda_graphs=cuda_graphs)
        model = llm.engine.runner.model  # graphs are captured lazily: after this table is in place
        shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, DispatchLinear)}
        gemv, dot = tg.DEFAULT_CONFIGS[0], tg.DEFAULT_CONFIGS[1]
        GpuLinearDispatcher(table={shape: [gemv, gemv, gemv, dot, dot, dot, dot] for shape in shapes}).apply(model)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]

    for cuda_graphs in (True, False):
        monkeypatch.setenv("THINKWISE_GEMM_EPILOGUE", "0")
        expected = run(cuda_graphs)
        monkeypatch.setenv("THINKWISE_GEMM_EPILOGUE", "1")
        assert run(cuda_graphs) == expected, cuda_graphs  # the fused epilogue rounds as silu_mul does
