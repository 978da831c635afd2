"""The Triton flat GEMM against its twin F.linear (CPU: TRITON_INTERPRET=1), and the GPU
dispatcher's table: built from profiling on CUDA, followed at run time everywhere."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from thinkwise.kernels import triton_gemm as tg
from thinkwise.kernels.linear_dispatch import TRITON_MIN_GAIN, DispatchLinear, GpuLinearDispatcher, \
    pick_implementation
from thinkwise.kernels.triton_gemm import FlatGemmConfig, SplitKWorkspace, plan_launch, triton_flat_gemm

pytestmark = pytest.mark.skipif(not tg.HAVE_TRITON, reason="triton is not installed")

CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(CUDA, reason="the GPU tests below cover CUDA")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Small tiles so CPU-sized shapes still have several N tiles, K steps, M tiles and splits.
SMALL_CONFIGS = [
    FlatGemmConfig(block_n=16, block_k=32, use_dot=False, max_rows=4),  # gemv, k per step shrinks with rows
    FlatGemmConfig(block_n=16, block_k=32, use_dot=False, max_rows=4, split_k=3),
    FlatGemmConfig(block_n=16, block_k=32, use_dot=False, max_rows=4, prefetch=2),  # two W tiles ahead
    FlatGemmConfig(block_n=16, block_k=32),  # dot, auto split (the interpreter's "4 SMs")
    FlatGemmConfig(block_n=32, block_k=16, split_k=4),
]
# (M, N, K): M off the tile size, N and K not powers of two (and K not a multiple of block_k).
SMALL_SHAPES = [(1, 40, 96), (3, 33, 80), (5, 48, 112), (17, 24, 72)]


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def rel_error(got, expected) -> float:
    assert torch.isfinite(got).all()
    return ((got.double() - expected).norm() / expected.norm()).item()


def interpret_or_skip():
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (the test suite's conftest does) to run Triton on CPU")


def dtypes_for(config: FlatGemmConfig):
    # The interpreter's bf16 tl.dot is broken (bits read as integers), so its dot is checked
    # in fp32 and fp16; bf16 dot runs in the GPU tests.
    return [torch.float32, torch.float16] if config.use_dot else [torch.float32, torch.bfloat16]


@interpreter_only
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_twin_in_interpreter(config, bias):
    interpret_or_skip()
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes_for(config):
        for m, n, k in SMALL_SHAPES[1:3] if bias else SMALL_SHAPES:
            x = torch.randn(m, k, generator=g).to(dtype)
            w = torch.randn(n, k, generator=g).to(dtype)
            b = torch.randn(n, generator=g).to(dtype) if bias else None
            got = triton_flat_gemm(x, w, b, config)
            assert got.dtype == dtype and got.shape == (m, n)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert rel_error(got, reference(x, w, b)) < tol, (dtype, m, n, k)


@interpreter_only
def test_split_k_rearms_counters_and_is_deterministic():
    interpret_or_skip()
    config = FlatGemmConfig(block_n=16, block_k=16, split_k=5)
    x, w = torch.randn(6, 160), torch.randn(50, 160)
    rows, n, k = 6, 50, 160
    assert plan_launch(rows, n, k, config, x.device).split_k == 5
    workspace = SplitKWorkspace(x.device, *tg.workspace_size(rows, n, k, config, x.device))
    first = triton_flat_gemm(x, w, None, config, workspace)
    assert int(workspace.counters.abs().sum()) == 0  # the last arrival re-armed every tile
    second = triton_flat_gemm(x, w, None, config, workspace)
    assert torch.equal(first, second)  # fixed-order sum of the partials
    assert rel_error(first, reference(x, w, None)) < 1e-6


@interpreter_only
def test_leading_dimensions_and_strided_input():
    interpret_or_skip()
    x = torch.randn(2, 3, 48)
    w = torch.randn(20, 48)
    got = triton_flat_gemm(x, w, None, SMALL_CONFIGS[3])
    assert got.shape == (2, 3, 20)
    assert rel_error(got, reference(x, w, None)) < 1e-6
    strided = torch.randn(48, 4).t()  # last dimension not contiguous
    assert rel_error(triton_flat_gemm(strided, w, None, SMALL_CONFIGS[0]), reference(strided, w, None)) < 1e-6


@pytest.mark.parametrize("rows,n,k", [(1, 4096, 4096), (1, 128256, 4096), (64, 1024, 3072), (3, 40, 96), (1, 16, 16)])
@pytest.mark.parametrize("config", list(tg.DEFAULT_CONFIGS) + SMALL_CONFIGS, ids=lambda c: c.name)
def test_launch_plan_covers_k_without_empty_splits(rows, n, k, config):
    device = torch.device("cuda" if CUDA else "cpu")
    if rows > config.max_rows:
        return
    plan = plan_launch(rows, n, k, config, device)
    assert plan.k_per_split % plan.block_k == 0
    assert (plan.split_k - 1) * plan.k_per_split < k <= plan.split_k * plan.k_per_split
    assert plan.block_m >= rows or plan.m_tiles * plan.block_m >= rows
    if not config.split_k and plan.split_k > 1:  # auto split: no more programs than the SMs hold
        assert plan.m_tiles * plan.n_tiles * plan.split_k <= tg.sm_count(device) * config.programs_per_sm


# ----------------------------------------------------------------------------- dispatch


class TwoShapes(nn.Module):
    def __init__(self, dtype=torch.float32, device="cpu", bias=False):
        super().__init__()
        self.a = nn.ModuleList(DispatchLinear(48, 40, bias=bias) for _ in range(2))
        self.b = DispatchLinear(40, 24, bias=False)
        for module in self.modules():
            if isinstance(module, DispatchLinear):
                nn.init.normal_(module.weight)
                if module.bias is not None:
                    nn.init.normal_(module.bias)
        self.to(device=device, dtype=dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_dispatcher_follows_a_given_table(monkeypatch, bias):
    interpret_or_skip()
    device = "cuda" if CUDA else "cpu"
    model = TwoShapes(device=device, bias=bias)
    gemv, dot_split = SMALL_CONFIGS[0], SMALL_CONFIGS[4]
    # rows ladder (1, 2, 4, 8, 16, 32, 64): gemv for 1-2, cuBLAS for 3-4, split-K dot for 5-16, then cuBLAS.
    table = {(40, 48): [gemv, gemv, None, dot_split, dot_split, None, None], (24, 40): [None] * 7}
    dispatcher = GpuLinearDispatcher(table=table)
    dispatcher.apply(model)
    assert model.b.row_plan is None and model.b.split_k_workspace is None
    assert model.a[0].split_k_workspace is model.a[1].split_k_workspace is not None
    calls: list[FlatGemmConfig] = []
    real = tg.triton_flat_gemm

    def recording(x, weight, bias_, config, workspace=None):
        calls.append(config)
        return real(x, weight, bias_, config, workspace)

    monkeypatch.setattr(tg, "triton_flat_gemm", recording)
    expected_config = {1: gemv, 2: gemv, 3: None, 4: None, 5: dot_split, 9: dot_split, 16: dot_split,
                       17: None, 64: None, 65: None}
    with torch.inference_mode():
        for rows, config in expected_config.items():
            layer = model.a[rows % 2]
            x = torch.randn(rows, 48, device=device)
            calls.clear()
            got = layer(x)
            assert calls == ([] if config is None else [config]), rows
            assert rel_error(got, reference(x, layer.weight, layer.bias)) < 1e-5
            calls.clear()
            model.b(torch.randn(rows, 40, device=device))
            assert calls == []
    described = dispatcher.describe()
    assert described["implementations"]["40x48"] == [
        {"rows": [1, 2], "impl": f"triton:{gemv.name}"}, {"rows": [3, 4], "impl": "cublas"},
        {"rows": [5, 16], "impl": f"triton:{dot_split.name}"}, {"rows": [17, 64], "impl": "cublas"},
        {"rows": [65, None], "impl": "cublas"}]
    assert described["implementations"]["24x40"] == [{"rows": [1, 64], "impl": "cublas"},
                                                     {"rows": [65, None], "impl": "cublas"}]
    json.dumps(described)


def test_pick_implementation_needs_a_clear_win_over_cublas():
    a, b = SMALL_CONFIGS[0], SMALL_CONFIGS[3]
    assert pick_implementation(10.0, {}) is None
    assert pick_implementation(10.0, {a: 12.0, b: 10.5}) is None  # cuBLAS faster: keep it
    assert pick_implementation(10.0, {a: 10.0 * (1 - TRITON_MIN_GAIN / 2)}) is None  # within noise
    assert pick_implementation(10.0, {a: 9.0, b: 8.0}) is b
    assert pick_implementation(10.0, {a: 7.0, b: 8.0}) is a
    assert pick_implementation(10.0, {a: 9.9}, min_gain=0.0) is a  # PDL steps: Triton wins ties
    assert pick_implementation(10.0, {a: 10.1}, min_gain=0.0) is None


def test_profile_skips_where_it_cannot_run():
    model = TwoShapes()
    dispatcher = GpuLinearDispatcher()
    dispatcher.profile(model, torch.float32)
    assert dispatcher.skipped and not dispatcher.table
    assert all(m.row_plan is None for m in model.modules() if isinstance(m, DispatchLinear))
    assert dispatcher.describe()["skipped"] == dispatcher.skipped


# ----------------------------------------------------------------------------- GPU

# Llama-3-8B: qkv, o, gate_up, down, lm_head; Qwen3-0.6B (hidden 1024): qkv, o, gate_up, down, lm_head.
REAL_SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
               (4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)]


@gpu_only
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_twin_on_gpu_real_shapes(shape):
    n, k = shape
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=g) * k**-0.5).bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16()
    configs = list(tg.DEFAULT_CONFIGS) + [FlatGemmConfig(block_n=64, block_k=128, split_k=7)]
    for rows in (1, 3, 8, 17, 64):
        x = torch.randn(rows, k, device="cuda", generator=g).bfloat16()
        expected = F.linear(x.float(), w.float(), b.float()).double()
        for config in configs:
            if rows > config.max_rows:
                continue
            for bias in (None, b) if rows in (1, 17) else (None,):
                got = triton_flat_gemm(x, w, bias, config)
                exp = expected if bias is not None else expected - b.double()
                assert rel_error(got, exp) < 1e-2, (config.name, rows, bias is not None)


@gpu_only
def test_split_k_on_gpu_is_deterministic_and_graph_safe():
    n, k = 1024, 3072
    w = torch.randn(n, k, device="cuda").bfloat16()
    config = FlatGemmConfig(block_n=64, block_k=128)  # auto split: 16 N tiles need splits to fill the SMs
    static_x = torch.randn(4, k, device="cuda").bfloat16()
    assert plan_launch(4, n, k, config, static_x.device).split_k > 1
    workspace = SplitKWorkspace("cuda", *tg.workspace_size(4, n, k, config, static_x.device))
    runs = [triton_flat_gemm(static_x, w, None, config, workspace) for _ in range(20)]
    assert all(torch.equal(runs[0], r) for r in runs)
    assert int(workspace.counters.abs().sum()) == 0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_flat_gemm(static_x, w, None, config, workspace)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = triton_flat_gemm(static_x, w, None, config, workspace)
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(static_out, F.linear(static_x.float(), w.float()).double()) < 1e-2


@gpu_only
def test_profile_builds_and_follows_a_table_on_gpu():
    class Qwen06Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(DispatchLinear(k, n, bias=False)
                                        for n, k in [(4096, 1024), (1024, 2048)] for _ in range(4))

    model = Qwen06Layers().to(device="cuda", dtype=torch.bfloat16)
    for layer in model.layers:
        nn.init.normal_(layer.weight, std=0.03)
    dispatcher = GpuLinearDispatcher()
    dispatcher.profile(model, torch.bfloat16)
    assert dispatcher.skipped is None and set(dispatcher.table) == {(4096, 1024), (1024, 2048)}
    described = dispatcher.describe()
    json.dumps(described)
    for key, timings in described["timings_us"].items():
        assert all(t > 0 for t in timings["cublas"]), key
        assert described["implementations"][key][-1] == {"rows": [65, None], "impl": "cublas"}
    with torch.inference_mode():
        for layer in (model.layers[0], model.layers[-1]):
            for rows in (1, 2, 3, 4, 7, 8, 16, 33, 64, 100):
                x = torch.randn(rows, layer.in_features, device="cuda", dtype=torch.bfloat16)
                assert rel_error(layer(x), F.linear(x.float(), layer.weight.float()).double()) < 1e-2


@gpu_only
def test_engine_records_the_table_in_run_metadata(tiny_llama):
    from thinkwise import LLM, SamplingParams

    directory, _ = tiny_llama
    llm = LLM(str(directory), device="cuda", dtype="bfloat16", block_size=4, num_kv_blocks=256)
    table = llm.engine.run_metadata["gemm_dispatch"]
    assert table["implementations"] and "skipped" not in table
    json.dumps(table)
    out = llm.generate([[256, 5, 9, 77]] * 3, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)
