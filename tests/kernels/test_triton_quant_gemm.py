"""The int8/int4 dequantizing Triton GEMM against its twin (CPU: TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from thinkwise.kernels import triton_quant_gemm as tq
from thinkwise.kernels.linear_methods.int4 import quantize_int4
from thinkwise.kernels.linear_methods.int8 import quantize_int8
from thinkwise.kernels.linear_methods.plans import planned_config
from thinkwise.kernels.triton_quant_gemm import QuantGemmConfig, dequantize_reference, pack_int4, \
    quant_gemm_reference, triton_quant_gemm, unpack_int4
from tests.ptx_evaluator import bf16, bf16_bits, run_ptx

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not tq.HAVE_TRITON, reason="triton is not installed")

# Small tiles so CPU-sized shapes have several N tiles, K steps and M tiles; block_k both
# below and above the int4 group (a tile inside one group, a tile over several).
SMALL_CONFIGS = [
    QuantGemmConfig(block_n=16, block_k=32, use_dot=False, max_rows=4),
    QuantGemmConfig(block_n=8, block_k=128, use_dot=False, max_rows=4),
    QuantGemmConfig(block_n=8, block_k=64, use_dot=False, max_rows=4, x_pairs=True),  # bf16 x read in pairs
    QuantGemmConfig(block_n=16, block_k=64),
    QuantGemmConfig(block_n=16, block_k=64, magic_decode=True),
    QuantGemmConfig(block_n=8, block_k=128, use_dot=False, max_rows=4, word_sums=True),
    QuantGemmConfig(block_n=32, block_k=16),
    QuantGemmConfig(block_n=8, block_k=64, use_dot=False, max_rows=4, half2=True),  # int4, bf16 x: fp16 pairs
    QuantGemmConfig(block_n=16, block_k=32, use_dot=False, max_rows=4, half2=True),
    QuantGemmConfig(block_n=16, block_k=32, use_dot=False, max_rows=4, prefetch=2),  # two weight tiles in flight
    QuantGemmConfig(block_n=8, block_k=64, use_dot=False, max_rows=4, x_pairs=True, prefetch=2),
    QuantGemmConfig(block_n=8, block_k=64, use_dot=False, max_rows=4, x_quads=True),  # int8, bf16 x: 64-bit quads
    QuantGemmConfig(block_n=4, block_k=128, use_dot=False, max_rows=4, x_quads=True, prefetch=2),
    QuantGemmConfig(block_n=16, block_k=64, weight_b=True),  # x @ W^T: the weights as the dot's B operand
    QuantGemmConfig(block_n=32, block_k=32, magic_decode=True, split_k=2, weight_b=True),
]
# (M, N, K): N off the tile, K a multiple of the int4 group but not always of block_k.
SHAPES = [(1, 40, 96), (3, 33, 128), (17, 24, 64)]


def device_and_check():
    if CUDA:
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (the test suite's conftest does) to run Triton on CPU")
    return torch.device("cpu")


def rel_error(got, expected) -> float:
    assert torch.isfinite(got).all()
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def dtypes_for(config):
    # The interpreter's bf16 tl.dot is broken (bits read as integers): dot tiles are checked
    # in fp32 and fp16 there, bf16 in the GPU run.
    if CUDA:
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.float16] if config.use_dot else [torch.float32, torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("bits", [8, 4])
def test_matches_twin(config, bits):
    device = device_and_check()
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes_for(config):
        for m, n, k in SHAPES:
            w = torch.randn(n, k, generator=g)
            x = torch.randn(m, k, generator=g).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype) if m == 3 else None
            if bits == 8:
                q, scales = quantize_int8(w, dtype)
                zeros, group = None, k
            else:
                group = 32
                codes, scales, zeros = quantize_int4(w, group, dtype)
                q = pack_int4(codes)
            args = [t.to(device) if t is not None else None for t in (q, scales, zeros, bias)]
            got = triton_quant_gemm(x.to(device), *args, group, config)
            assert got.shape == (m, n) and got.dtype == dtype
            want = quant_gemm_reference(x.double(), q, scales.double(), None if zeros is None else zeros.double(),
                                        None if bias is None else bias.double(), group)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert rel_error(got.cpu(), want) < tol, (dtype, m, n, k)


@needs_triton
def test_leading_dimensions_and_strided_input():
    device = device_and_check()
    w = torch.randn(20, 64)
    q, scales = quantize_int8(w, torch.float32)
    x = torch.randn(2, 3, 64)
    got = triton_quant_gemm(x.to(device), q.to(device), scales.to(device), None, None, 64, SMALL_CONFIGS[2])
    assert got.shape == (2, 3, 20)
    assert rel_error(got.cpu(), quant_gemm_reference(x, q, scales, None, None, 64)) < 1e-6
    strided = torch.randn(64, 4).t()
    got = triton_quant_gemm(strided.to(device), q.to(device), scales.to(device), None, None, 64, SMALL_CONFIGS[0])
    assert rel_error(got.cpu(), quant_gemm_reference(strided, q, scales, None, None, 64)) < 1e-6


@needs_triton
def test_a_wrong_group_size_is_refused():
    codes, scales, zeros = quantize_int4(torch.randn(16, 96), 32, torch.float32)
    with pytest.raises(ValueError, match="divisible by the group"):
        triton_quant_gemm(torch.randn(1, 96), pack_int4(codes), scales, zeros, None, 64, SMALL_CONFIGS[0])


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 4) and torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # low nibble = even k


def test_twin_dequantizes_the_stored_form():
    w = torch.randn(8, 64)
    codes, scales, zeros = quantize_int4(w, 32, torch.float32)
    deq = tq.dequantize_reference(pack_int4(codes), scales, zeros, 32)
    # Round to nearest: each weight within half a step of its group's grid.
    step = scales.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    q8, s8 = quantize_int8(w, torch.float32)
    assert ((tq.dequantize_reference(q8, s8, None, 64) - w).abs() <= s8[:, None] / 2 + 1e-6).all()


def test_layers_follow_the_installed_plan():
    class Layer:
        quant_plan = (None, "one-row", "two-rows")
        quant_plan_above = "prefill"

    assert planned_config(Layer, 1) == "one-row" and planned_config(Layer, 2) == "two-rows"
    assert planned_config(Layer, 300) == "prefill"
    assert planned_config(object(), 1) is None  # no table: dequantize + cuBLAS

    class Rungs(Layer):
        quant_plan_above = [(256, "mid"), (None, None)]  # above 256 rows: dequantize + cuBLAS

    assert planned_config(Rungs, 3) == "mid" and planned_config(Rungs, 256) == "mid"
    assert planned_config(Rungs, 257) is None and planned_config(Rungs, 10**6) is None


@needs_triton
@pytest.mark.parametrize("group", [64, 128])
def test_int4_wider_groups_match_twin(group):
    device = device_and_check()
    g = torch.Generator().manual_seed(1)
    for config, rows in [(c, m) for c in SMALL_CONFIGS for m in (1, 3)]:  # one row: the grouped-sum GEMV
        dtype = torch.float32
        w = torch.randn(24, 256, generator=g)
        x = torch.randn(rows, 256, generator=g)
        codes, scales, zeros = quantize_int4(w, group, dtype)
        q = pack_int4(codes)
        got = triton_quant_gemm(x.to(device), q.to(device), scales.to(device), zeros.to(device), None, group, config)
        want = quant_gemm_reference(x.double(), q, scales.double(), zeros.double(), None, group)
        assert rel_error(got.cpu(), want) < 1e-6, config.name


@needs_triton
@pytest.mark.parametrize("shared", [True, False])  # one workspace for every call, or a fresh one per call
@pytest.mark.parametrize("bits", [8, 4])
def test_split_k_matches_twin_and_adds_the_bias_once(bits, shared):
    """K cut into slices (uneven: 8 tiles over 3 slices), summed in the kernel by the last slice
    to arrive: equal to the twin, with the bias added once (not once per slice), the same bits
    on a second call, over several M and N tiles, and the counters left at zero for the next
    call (a shared workspace serves every layer and every CUDA-graph replay)."""
    from thinkwise.kernels.triton_gemm import SplitKWorkspace

    device = device_and_check()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 512, generator=g)
    x = torch.randn(70, 512, generator=g)  # two 64-row tiles, the second one partial
    bias = torch.randn(40, generator=g)
    if bits == 8:
        q, scales = quantize_int8(w, torch.float32)
        zeros, group = None, 512
    else:
        codes, scales, zeros = quantize_int4(w, 32, torch.float32)
        q, group = pack_int4(codes), 32
    config = QuantGemmConfig(block_n=16, block_k=64, split_k=3)
    partials, counters = tq.workspace_size(70, 40, 512, group, bits == 4, config)
    assert (partials, counters) == (3 * 70 * 40, 2 * 3)  # 3 slices; 2 x 3 tiles
    assert tq.workspace_size(70, 40, 512, group, bits == 4, QuantGemmConfig(block_n=16, block_k=64)) == (0, 0)
    workspace = SplitKWorkspace(device, 3 * 70 * 48, counters) if shared else None
    args = [t.to(device) if t is not None else None for t in (q, scales, zeros, bias)]
    got = triton_quant_gemm(x.to(device), *args, group, config, workspace=workspace)
    want = quant_gemm_reference(x.double(), q, scales.double(), None if zeros is None else zeros.double(),
                                bias.double(), group)
    assert rel_error(got.cpu(), want) < 1e-6
    assert torch.equal(got, triton_quant_gemm(x.to(device), *args, group, config, workspace=workspace))
    if shared:
        assert int(workspace.counters.abs().sum()) == 0
    # The fused SiLU * up epilogue after the in-kernel sum ([gate; up] of 48 rows: whole 8-row
    # halves of the 16-row tiles), through the same workspace (sized for it below).
    w48 = torch.randn(48, 512, generator=g)
    q48, s48 = quantize_int8(w48, torch.float32)
    fused = triton_quant_gemm(x.to(device), q48.to(device), s48.to(device), None, None, 512, config,
                              tq.EPILOGUE_SILU_MUL, workspace)
    plain = quant_gemm_reference(x, q48, s48, None, None, 512)
    gate, up = plain.chunk(2, dim=-1)
    assert rel_error(fused.cpu(), torch.nn.functional.silu(gate) * up) < 1e-5
    if shared:
        assert int(workspace.counters.abs().sum()) == 0


@needs_triton
@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_kernel_equals_the_twin_bit_for_bit(bits, group, dtype):
    """The Triton dequantize (dequantize-then-cuBLAS on CUDA) must write exactly the twin's
    values rounded once: N and K off its 16 x 256 tile, scales and zeros in the activations' dtype."""
    device = device_and_check()
    g = torch.Generator().manual_seed(bits + group)
    weight = torch.randn(37, 384, generator=g) * 0.05
    if bits == 8:
        q, scales = quantize_int8(weight, dtype)
        zeros = None
    else:
        codes, scales, zeros = quantize_int4(weight, group, dtype)
        q, zeros = pack_int4(codes), zeros.to(device)
    q, scales = q.to(device), scales.to(device)
    want = tq.dequantize_reference(q, scales, zeros, group or 384).to(dtype)
    got = tq.dequantize(q, scales, zeros, group or 384, dtype, use_triton=True)
    assert got.dtype == dtype and torch.equal(got, want)
    # Other tiles, and int4's scales loaded once per group (broadcast) or once per code byte.
    for tile in ((8, 128, 4), (32, 512, 8)):
        for group_loads in ((False, True) if bits == 4 and tile[1] % group == 0 else (False,)):
            got = tq.dequantize(q, scales, zeros, group or 384, dtype, use_triton=True, tile=tile,
                                group_loads=group_loads)
            assert torch.equal(got, want), (tile, group_loads)
    for bad in ((3, 256, 4), (16, 1, 4), (16, 256, 64), (0, 256, 4)):
        with pytest.raises(ValueError, match="powers of two"):
            tq.dequantize(q, scales, zeros, group or 384, dtype, use_triton=True, tile=bad)
    assert torch.equal(tq.dequantize(q, scales, zeros, group or 384, dtype, use_triton=False), want)


# ----------------------------------------------------------------------------- bf16-pair int4 dot tiles


def test_int4_word_to_bf16_ptx_every_code_in_every_nibble():
    """The `pairs` tiles' PTX, run by the evaluator: eight codes of a word -> eight bf16
    weights in k order, each (code - 8) * scale + zero rounded once."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        codes = [int(c) for c in rng.integers(0, 16, 8)]
        codes[trial % 8] = trial % 16  # every code in every nibble
        word = sum(c << (4 * j) for j, c in enumerate(codes))
        scale, zero = (float(torch.tensor(v).bfloat16()) for v in rng.standard_normal(2) * 10.0 ** rng.integers(-4, 2))
        got = run_ptx(tq.INT4_WORD_TO_BF16, [word, bf16_bits(scale), bf16_bits(zero)], 8)
        for j, bits in enumerate(got):
            assert bits == bf16_bits((codes[j] - 8) * scale + zero), (trial, j, bf16(bits))


@needs_triton
def test_x_quads_tiles_fall_back_where_x_cannot_be_read_as_quads():
    """An x_quads tiling on an x whose rows do not start on 8 bytes (a sliced view) or on int4
    codes takes the plain path and still matches the twin."""
    device = device_and_check()
    config = QuantGemmConfig(block_n=8, block_k=64, use_dot=False, max_rows=4, x_quads=True)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 64, generator=g)
    q, scales = quantize_int8(w, torch.bfloat16)
    wide = torch.randn(2, 65, generator=g).bfloat16()
    for x in (wide[:, 1:], wide[:, :64]):  # storage offset 1 (odd row stride too), then aligned start
        assert tq._int64_quads_ok(x) is False
        got = triton_quant_gemm(x.to(device), q.to(device), scales.to(device), None, None, 64, config)
        want = quant_gemm_reference(x.double(), q, scales.double(), None, None, 64)
        assert rel_error(got.cpu(), want) < 1e-2
    codes, scales4, zeros = quantize_int4(w, 32, torch.bfloat16)
    x = torch.randn(3, 64, generator=g).bfloat16()
    got = triton_quant_gemm(x.to(device), pack_int4(codes).to(device), scales4.to(device), zeros.to(device), None,
                            32, config)
    want = quant_gemm_reference(x.double(), pack_int4(codes), scales4.double(), zeros.double(), None, 32)
    assert rel_error(got.cpu(), want) < 1e-2


def test_int8_lane_prmt_every_code_in_every_byte():
    """The x_quads GEMV's PTX decode, run by the evaluator: byte j of a sign-flipped word of
    int8 codes, in the magic word's mantissa, is the float 2^23 + q + 128 (the kernel then
    subtracts 2^23 + 128), for every code in every byte."""
    rng = np.random.default_rng(0)
    for trial in range(256 * 4):
        codes = [int(c) for c in rng.integers(-128, 128, 4)]
        codes[trial % 4] = trial // 4 - 128  # every code in every byte
        word = sum((c & 0xFF) << (8 * j) for j, c in enumerate(codes))
        flipped = word ^ 0x80808080
        for j, asm in enumerate(tq.INT8_LANE_TO_F32):
            (bits,) = run_ptx(asm, [flipped, tq.INT8_MAGIC_WORD], 1)
            assert np.uint32(bits).view(np.float32) - np.float32(8388736.0) == codes[j], (trial, j)


@needs_triton
@pytest.mark.parametrize("weight_b", [False, True, "decode_ahead"])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_pairs_dot_tiles_match_twin(group, split_k, weight_b, monkeypatch):
    """Weights decoded in bf16 pairs, then the dot: the twin with its weights rounded to bf16.
    On the CPU the interpreter runs the same loads, decode arithmetic and k-order join with
    fp32 x (its bf16 dot is broken), which the tiles take when PAIRS_DTYPES lets them.
    `decode_ahead` (weight_b): each slice's first tile decoded before its loop, the next one after
    each dot, its codes and scales read past the slice's end (never used) or masked past K."""
    device = device_and_check()
    if not CUDA:
        monkeypatch.setattr(tq, "PAIRS_DTYPES", (torch.bfloat16, torch.float32))
    dtype = torch.bfloat16 if CUDA else torch.float32
    config = QuantGemmConfig(block_n=16, block_k=64, bf16_pairs=True, split_k=split_k, weight_b=bool(weight_b),
                             decode_ahead=weight_b == "decode_ahead")
    assert config.name.endswith({False: "_p2", True: "_p2_wb", "decode_ahead": "_p2_wb_da"}[weight_b])
    g = torch.Generator().manual_seed(group)
    for m, n, k in [(17, 40, 4 * group), (3, 33, 2 * group)]:
        codes, scales, zeros = quantize_int4(torch.randn(n, k, generator=g), group, torch.bfloat16)
        q = pack_int4(codes)
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        got = triton_quant_gemm(x.to(device), q.to(device), scales.to(device), zeros.to(device), bias.to(device),
                                group, config).cpu()
        weight = dequantize_reference(q, scales, zeros, group).to(torch.bfloat16).double()
        want = torch.nn.functional.linear(x.double(), weight, bias.double())
        assert rel_error(got, want) < (1e-2 if dtype == torch.bfloat16 else 1e-6), (m, n, k)


@needs_triton
def test_pairs_tiles_are_offered_only_for_int4_and_taken_only_for_bf16_x(monkeypatch):
    from thinkwise.kernels.linear_methods.plans import quant_candidates

    class Layer:
        bias = None

    q8 = torch.zeros(8, 64, dtype=torch.int8)
    offered8 = quant_candidates(Layer(), 64, q8, torch.ones(8, 1), None, 64)
    offered4 = quant_candidates(Layer(), 64, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2).bfloat16(),
                                torch.zeros(8, 2).bfloat16(), 32)
    assert not any(c.bf16_pairs for c, _ in offered8.values())
    assert any(c.bf16_pairs for c, _ in offered4.values())
    assert tq.PAIRS_DTYPES == (torch.bfloat16,)  # fp32 x (LayerCast) keeps exact fp32 weights
    seen = {}

    class Spy:  # records the flag; the launch itself is not needed (the interpreter's bf16 dot is broken)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen["PAIRS"] = kwargs["PAIRS"]
            return launch

    monkeypatch.setattr(tq, "_quant_gemm_kernel", Spy())
    codes, scales, zeros = quantize_int4(torch.randn(8, 64), 32, torch.bfloat16)
    config = QuantGemmConfig(block_n=16, block_k=64, bf16_pairs=True)
    device = "cuda" if CUDA else "cpu"
    for dtype, taken in ((torch.float32, False), (torch.float16, False), (torch.bfloat16, True)):
        triton_quant_gemm(torch.randn(16, 64, device=device).to(dtype), pack_int4(codes).to(device),
                          scales.to(device), zeros.to(device), None, 32, config)
        assert seen["PAIRS"] is taken, dtype
    # A model in another dtype (its scales tell) is not offered them: they would duplicate the rest.
    offered16 = quant_candidates(Layer(), 64, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2).half(),
                                 torch.zeros(8, 2).half(), 32)
    assert offered16 and not any(c.bf16_pairs for c, _ in offered16.values())


@needs_triton
@pytest.mark.parametrize("bits", [8, 4, "4-decode-ahead"])
def test_weight_b_tiles_fuse_silu_mul_and_split_k(bits):
    """The `weight_b` tiles (x the dot's A operand, the dequantized weight tile its B operand,
    the int4 group scales read a tile ahead): a [gate; up] weight with the fused SiLU * up
    epilogue, over uneven split-K slices (8 tiles over 3) and two M tiles, equal to the twin
    followed by SiLU * up, and the counters of a shared workspace left at zero."""
    from thinkwise.kernels.triton_gemm import SplitKWorkspace

    device = device_and_check()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=g)
    x = torch.randn(70, 256, generator=g)
    if bits == 8:
        q, scales = quantize_int8(w, torch.float32)
        zeros, group = None, 256
    else:
        codes, scales, zeros = quantize_int4(w, 32, torch.float32)
        q, group = pack_int4(codes), 32
    ahead = bits == "4-decode-ahead"
    config = QuantGemmConfig(block_n=16, block_k=32, split_k=3, weight_b=True, decode_ahead=ahead)
    assert config.name == "dot_n16_k32_w4_s3_sk3_wb" + ("_da" if ahead else "")
    partials, counters = tq.workspace_size(70, 48, 256, group, bits != 8, config)
    workspace = SplitKWorkspace(device, partials, counters)
    args = [t.to(device) if t is not None else None for t in (q, scales, zeros)]
    fused = triton_quant_gemm(x.to(device), *args, None, group, config, tq.EPILOGUE_SILU_MUL, workspace)
    plain = quant_gemm_reference(x.double(), q, scales.double(), None if zeros is None else zeros.double(), None,
                                 group)
    gate, up = plain.chunk(2, dim=-1)
    assert fused.shape == (70, 24)
    assert rel_error(fused.cpu(), torch.nn.functional.silu(gate) * up) < 1e-5
    assert int(workspace.counters.abs().sum()) == 0


@needs_triton
@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("pairs", [False, True])
def test_weight_b_tiles_inside_a_group_match_twin(pairs, ahead, monkeypatch):
    """`weight_b` int4 tiles narrower than the group (K tile 32, groups of 64 and 128): each tile
    takes its one group's scale and zero, over split-K slices that start inside a group (8 tiles
    over 3 slices: the second starts at k = 96), with and without decoding a tile ahead."""
    device = device_and_check()
    if pairs and not CUDA:
        monkeypatch.setattr(tq, "PAIRS_DTYPES", (torch.bfloat16, torch.float32))
    dtype = torch.bfloat16 if CUDA and pairs else torch.float32
    g = torch.Generator().manual_seed(11)
    for group in (64, 128):
        config = QuantGemmConfig(block_n=16, block_k=32, split_k=3, weight_b=True, bf16_pairs=pairs,
                                 decode_ahead=ahead)
        assert tq._block_k(256, group, True, config) == 32  # not raised to the group
        codes, scales, zeros = quantize_int4(torch.randn(40, 256, generator=g), group, torch.bfloat16)
        q = pack_int4(codes)
        x = torch.randn(19, 256, generator=g).to(dtype)
        got = triton_quant_gemm(x.to(device), q.to(device), scales.to(device), zeros.to(device), None, group,
                                config).cpu()
        weight = dequantize_reference(q, scales, zeros, group)
        want = torch.nn.functional.linear(x.double(), (weight.to(torch.bfloat16) if pairs else weight).double())
        assert rel_error(got, want) < (1e-2 if dtype == torch.bfloat16 else 1e-6), group
    # Other tiles still span whole groups.
    assert tq._block_k(256, 128, True, QuantGemmConfig(block_n=16, block_k=32)) == 128


# (int4, BLOCK_M, PAIRS, SPLIT_K, EPILOGUE, DECODE_AHEAD or "k64": a K tile of 64 inside a group of
# 128): 64-row tiles (wgmma) and a 16-row one (mma.sync)
WEIGHT_B_SM90_VARIANTS = [(True, 64, True, 4, 0, False), (True, 64, True, 1, 1, False), (True, 16, False, 1, 0, False),
                          (False, 64, False, 2, 1, False), (True, 64, True, 4, 1, True), (True, 64, True, 1, 1, "k64")]


def compile_weight_b_variants_for_sm90() -> list[str]:
    """In a child without TRITON_INTERPRET: each variant compiled to an sm_90 cubin, "ok" or its error."""
    from tests.kernels.test_sm90_compile import compile_for_sm90

    results = []
    for int4, block_m, pairs, split_k, epilogue, ahead in WEIGHT_B_SM90_VARIANTS:
        types = {"x_ptr": "*bf16", "q_ptr": "*u8" if int4 else "*i8", "scale_ptr": "*bf16", "zero_ptr": "*bf16",
                 "bias_ptr": "*bf16", "out_ptr": "*bf16", "partial_ptr": "*fp32", "counter_ptr": "*i32"}
        try:
            ok = compile_for_sm90(tq._quant_gemm_wb_kernel, types, dict(
                GROUP=128, INT4=int4, BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64 if ahead == "k64" else 128,
                HAS_BIAS=not epilogue, IEEE=False, PDL=True, SPLIT_K=split_k, MAGIC=not pairs, PAIRS=pairs, ASM=True,
                EPILOGUE=epilogue, DECODE_AHEAD=ahead is True))
            results.append("ok" if ok else "no cubin")
        except FileNotFoundError as missing:  # a Triton build without its bundled ptxas
            return [f"skip: {missing}"]
        except Exception as error:  # noqa: BLE001 - reported to the test
            results.append(f"{type(error).__name__}: {str(error)[:1000]}")
    return results


@needs_triton
@pytest.mark.skipif(CUDA, reason="on a GPU the kernels are compiled for real")
def test_weight_b_kernel_compiles_for_sm90():
    """The interpreter checks no lowering: the `weight_b` kernel (wgmma with the weights as
    the shared-memory B operand; mma.sync at 16 rows) compiled for an H100 down to a cubin."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, '.'); from tests.kernels.test_triton_quant_gemm import "
            "compile_weight_b_variants_for_sm90 as c; print(json.dumps(c()))")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if results and results[0].startswith("skip"):
        pytest.skip(results[0])
    assert results == ["ok"] * len(WEIGHT_B_SM90_VARIANTS), results
