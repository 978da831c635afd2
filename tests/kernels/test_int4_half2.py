"""The fp16-pair int4 GEMV (`triton_int4_half2`): its PTX, run by a small PTX evaluator on the
CPU, and the kernel (interpreter path on CPU, PTX path on a GPU) against the twin.

The PTX blocks cannot run under the Triton interpreter, and the lent GPU is not always there,
so the two asm strings are executed instruction by instruction by `tests/ptx_evaluator.py`
(fp16 and fp32 rounding through NumPy) and compared with exact arithmetic: a wrong magic
constant, lop3 table, pair order or shift fails these tests without a GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from thinkwise.kernels import triton_int4_half2 as h2
from thinkwise.kernels import triton_quant_gemm as tq
from thinkwise.kernels.linear_methods.int4 import quantize_int4
from thinkwise.kernels.triton_quant_gemm import QuantGemmConfig, pack_int4, quant_gemm_reference, triton_quant_gemm
from tests.ptx_evaluator import bf16_bits, f16, f16_bits, f32, run_ptx

CUDA = torch.cuda.is_available()


def bf16_pair(low: float, high: float) -> int:
    return bf16_bits(low) | (bf16_bits(high) << 16)


@pytest.mark.parametrize("magnitude", [1.0, 1e-3, 3e3, 2e5])
def test_x_to_half_pairs_ptx(magnitude):
    rng = np.random.default_rng(int(magnitude * 10))
    for _ in range(50):
        x = torch.tensor(rng.standard_normal(8) * magnitude, dtype=torch.bfloat16).float().tolist()
        pairs = [bf16_pair(x[0], x[1]), bf16_pair(x[2], x[3]), bf16_pair(x[4], x[5]), bf16_pair(x[6], x[7])]
        h04, h15, h26, h37, total = run_ptx(h2.X_TO_HALF_PAIRS, pairs, 5)
        for pair, (low, high) in zip((h04, h15, h26, h37), ((0, 4), (1, 5), (2, 6), (3, 7))):
            assert float(f16(pair)) == float(np.float16(np.float32(x[low]) * np.float32(2.0 ** -8)))
            assert float(f16(pair >> 16)) == float(np.float16(np.float32(x[high]) * np.float32(2.0 ** -8)))
            assert np.isfinite(float(f16(pair))) and np.isfinite(float(f16(pair >> 16)))
        assert float(f32(total)) == pytest.approx(sum(x), rel=1e-5, abs=1e-6 * magnitude)


def test_word_dot_ptx_every_code():
    """Every code 0..15 in every one of the eight nibbles, against exact (c - 8) * x."""
    rng = np.random.default_rng(1)
    for trial in range(64):
        codes = [(trial + 3 * j) % 16 for j in range(8)] if trial < 16 else rng.integers(0, 16, 8).tolist()
        word = sum(c << (4 * j) for j, c in enumerate(codes))
        x = (rng.standard_normal(8) * 0.01).astype(np.float16)  # already x * 2^-8, as fp16
        xh = [f16_bits(v) for v in x]
        pairs = [xh[0] | (xh[4] << 16), xh[1] | (xh[5] << 16), xh[2] | (xh[6] << 16), xh[3] | (xh[7] << 16)]
        (got,) = run_ptx(h2.WORD_DOT, [word, *pairs], 1)
        exact = sum((c - 8) * float(v) for c, v in zip(codes, x))
        # four fp16 roundings of sums at most sum |products|: half an fp16 ulp (2^-11) each
        bound = 4 * 2.0 ** -11 * sum(abs(c - 8) * abs(float(v)) for c, v in zip(codes, x))
        assert abs(float(f32(got)) - exact) <= bound, codes
    # one-hot words: each nibble's code lands on its own x (a swapped pair or shift fails here)
    for j in range(8):
        x = np.zeros(8, dtype=np.float16)
        x[j] = 1.0
        xh = [f16_bits(v) for v in x]
        pairs = [xh[0] | (xh[4] << 16), xh[1] | (xh[5] << 16), xh[2] | (xh[6] << 16), xh[3] | (xh[7] << 16)]
        for code in (0, 7, 15):
            word = (code << (4 * j)) | sum(8 << (4 * i) for i in range(8) if i != j)  # others contribute 0
            (got,) = run_ptx(h2.WORD_DOT, [word, *pairs], 1)
            assert float(f32(got)) == code - 8


def device_or_skip():
    if CUDA:
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1" or not tq.HAVE_TRITON:
        pytest.skip("needs triton under TRITON_INTERPRET=1 (the suite's conftest sets it)")
    return torch.device("cpu")


@pytest.mark.parametrize("group,block_k", [(32, 32), (32, 128), (64, 64), (128, 256)])
def test_kernel_matches_twin(group, block_k):
    """Groups of 32/64/128, one or several groups a tile, K not a multiple of the tile, N off
    the tile, 1..4 rows, a bias, and x from 1e-3 up to 2e5 (the 2^-8 scaling keeps fp16
    products finite)."""
    device = device_or_skip()
    g = torch.Generator().manual_seed(group + block_k)
    config = QuantGemmConfig(block_n=8, block_k=block_k, use_dot=False, max_rows=4, half2=True)
    for m, n, k, magnitude in ((1, 24, 3 * group, 1.0), (3, 13, 5 * group, 2e5), (4, 8, 2 * group, 1e-3)):
        w = torch.randn(n, k, generator=g) * 0.05 + 0.01
        x = (torch.randn(m, k, generator=g) * magnitude).to(torch.bfloat16)
        bias = torch.randn(n, generator=g).to(torch.bfloat16) if m == 3 else None
        codes, scales, zeros = quantize_int4(w, group, torch.bfloat16)
        q = pack_int4(codes)
        args = [t.to(device) if t is not None else None for t in (q, scales, zeros, bias)]
        got = triton_quant_gemm(x.to(device), *args, group, config).cpu()
        want = quant_gemm_reference(x.double(), q, scales.double(), zeros.double(),
                                    None if bias is None else bias.double(), group)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        error = ((got.double() - want).norm() / want.norm()).item()
        assert error < 1e-2, (m, n, k, magnitude, error)


def test_other_dtypes_take_the_plain_gemv():
    """fp16 and fp32 x with a half2 tiling run the plain GEMV at the same tile sizes (the fp16
    pairs are built from bf16 bits): still the twin's result."""
    device = device_or_skip()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 64, generator=g)
    codes, scales, zeros = quantize_int4(w, 32, torch.float32)
    q = pack_int4(codes)
    config = QuantGemmConfig(block_n=8, block_k=64, use_dot=False, max_rows=4, half2=True)
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(2, 64, generator=g).to(dtype)
        got = triton_quant_gemm(x.to(device), q.to(device), scales.to(dtype).to(device), zeros.to(dtype).to(device),
                                None, 32, config).cpu()
        want = quant_gemm_reference(x.double(), q, scales.to(dtype).double(), zeros.to(dtype).double(), None, 32)
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


def test_bad_arguments_are_refused():
    x = torch.zeros(1, 64, dtype=torch.float16)
    words = torch.zeros(4, 8, dtype=torch.int32)
    s = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="bf16"):
        h2.int4_gemv_half2(x, words, s, s, None, torch.empty(1, 4), 32, 8, 64, 4, 2)
    with pytest.raises(ValueError, match="multiples of the group"):
        h2.int4_gemv_half2(x.bfloat16(), words, s, s, None, torch.empty(1, 4), 32, 8, 48, 4, 2)


def test_half2_tilings_are_offered_only_for_int4():
    from thinkwise.kernels.linear_methods.plans import quant_candidates

    if not tq.HAVE_TRITON:
        pytest.skip("triton is not installed")

    class Layer:
        bias = None

    q = torch.zeros(8, 32, dtype=torch.uint8)
    int4 = quant_candidates(Layer(), 1, q, torch.zeros(8, 2), torch.zeros(8, 2), 32)
    int8 = quant_candidates(Layer(), 1, q, torch.zeros(8, 1), None, 32)
    assert any(name.endswith("_h2") for name in int4)
    assert not any(name.endswith("_h2") for name in int8)


def test_odd_offset_rows_take_the_plain_gemv():
    """A bf16 x starting at an odd element cannot be read as int32 pairs: the plain GEMV runs."""
    device = device_or_skip()
    g = torch.Generator().manual_seed(9)
    w = torch.randn(16, 64, generator=g)
    codes, scales, zeros = quantize_int4(w, 32, torch.bfloat16)
    q = pack_int4(codes)
    x = torch.randn(1, 66, generator=g).to(torch.bfloat16)[:, 1:65]  # even row stride, storage offset 1
    assert x.storage_offset() % 2 == 1 and x.stride(0) % 2 == 0
    config = QuantGemmConfig(block_n=8, block_k=64, use_dot=False, max_rows=4, half2=True)
    got = triton_quant_gemm(x.to(device), q.to(device), scales.to(device), zeros.to(device), None, 32, config).cpu()
    want = quant_gemm_reference(x.double(), q, scales.double(), zeros.double(), None, 32)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
