"""The Triton split-KV decode kernel against its PyTorch twin (CPU: TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
import warnings

import math

import numpy as np
import pytest
import torch

from thinkwise.kernels.paged_attention import FP8KVCache, decode_attention, pack_prefix_groups, quantize_fp8
from thinkwise.kernels import triton_decode_attention as tda
from tests.ptx_evaluator import e4m3, f16, run_ptx

pytestmark = pytest.mark.skipif(not tda.HAVE_TRITON, reason="triton is not installed")


@pytest.fixture(params=["triton", "registers"])
def pipelining(request, monkeypatch):
    """Both ways the split and prefix kernels pipeline their tile loop: Triton's (through shared
    memory) and by hand in registers, for 16-bit and fp8 caches alike."""
    by_hand = request.param == "registers"
    monkeypatch.setattr(tda, "PREFETCH_16BIT", by_hand)
    monkeypatch.setattr(tda, "FP8_PREFETCH", by_hand)
    return request.param


def make_case(batch, heads, kv_heads, head_dim, block_size, lens, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum((n + block_size - 1) // block_size for n in lens) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    query = torch.randn(batch, heads, head_dim, generator=g).to(dtype).to(device)
    # Shuffled, non-contiguous block tables, as a real cache would have.
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max((n + block_size - 1) // block_size for n in lens)
    tables = torch.zeros(batch, width, dtype=torch.long)
    cursor = 0
    for b, n in enumerate(lens):
        count = (n + block_size - 1) // block_size
        tables[b, :count] = torch.tensor(order[cursor : cursor + count])
        cursor += count
    return query, k_cache, v_cache, tables.to(device), torch.tensor(lens, device=device)


CASES = [
    # batch, heads, kv_heads, head_dim, block_size, lengths
    (3, 4, 2, 16, 4, [1, 37, 70]),
    (2, 8, 1, 32, 16, [16, 129]),
    (1, 2, 2, 16, 32, [300]),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU module covers CUDA")
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_in_interpreter(case, monkeypatch, pipelining):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (the test suite's conftest does) to run Triton on CPU")
    batch, heads, kv_heads, head_dim, block_size, lens = case
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, torch.float32, "cpu")
    expected = decode_attention(q, k, v, tables, seq_lens, max(lens), head_dim**-0.5)
    got = tda.triton_decode_attention(q, k, v, tables, seq_lens, max(lens), head_dim**-0.5)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES + [(64, 32, 8, 128, 16, [4096] * 64), (4, 14, 2, 64, 16, [5, 900, 33, 2048])])
def test_matches_reference_on_gpu(case, dtype, pipelining):
    batch, heads, kv_heads, head_dim, block_size, lens = case
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, dtype, "cuda")
    expected = decode_attention(q.float(), k.float(), v.float(), tables, seq_lens, max(lens), head_dim**-0.5)
    got = tda.triton_decode_attention(q, k, v, tables, seq_lens, max(lens), head_dim**-0.5).float()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2)


def shared_prefix_case(members, prefix_len, suffix_lens, heads, kv_heads, head_dim, block_size, dtype, device, seed=1):
    """Rows 0..members-1 share the first prefix_len tokens' blocks (as forked samples do);
    row `members` is an unrelated sequence."""
    g = torch.Generator().manual_seed(seed)
    prefix_blocks = prefix_len // block_size
    lens = [prefix_len + s for s in suffix_lens] + [prefix_len // 2 + 5]
    own = [(n - prefix_len + block_size - 1) // block_size for n in lens[:-1]] + [(lens[-1] + block_size - 1) // block_size]
    num_blocks = prefix_blocks + sum(own) + 2
    order = torch.randperm(num_blocks, generator=g).tolist()
    shared, cursor = order[:prefix_blocks], prefix_blocks
    width = max(prefix_blocks + o for o in own)
    tables = torch.zeros(members + 1, width, dtype=torch.long)
    for row in range(members + 1):
        table = (shared if row < members else []) + order[cursor:cursor + own[row]]
        cursor += own[row]
        tables[row, :len(table)] = torch.tensor(table)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype).to(device)
    query = torch.randn(members + 1, heads, head_dim, generator=g).to(dtype).to(device)
    prefix = pack_prefix_groups([list(range(members))], [prefix_len], members + 1, device)
    return query, k_cache, v_cache, tables.to(device), torch.tensor(lens, device=device), prefix


def interpreter_only():
    if torch.cuda.is_available():
        pytest.skip("the GPU module covers CUDA")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (the test suite's conftest does) to run Triton on CPU")


def test_cascade_reference_equals_plain_attention():
    q, k, v, tables, lens, prefix = shared_prefix_case(3, 32, [1, 9, 17], 4, 2, 16, 4, torch.float32, "cpu")
    scale = 0.25
    plain = decode_attention(q, k, v, tables, lens, int(lens.max()), scale)
    cascade = decode_attention(q, k, v, tables, lens, int(lens.max()), scale, prefix=prefix)
    assert (plain - cascade).abs().max().item() < 1e-5


@pytest.mark.parametrize("unified", [False, True])
def test_cascade_kernel_matches_reference_in_interpreter(unified, pipelining):
    interpreter_only()
    q, k, v, tables, lens, prefix = shared_prefix_case(3, 32, [1, 9, 17], 4, 2, 16, 4, torch.float32, "cpu")
    scale = 0.25
    expected = decode_attention(q, k, v, tables, lens, int(lens.max()), scale)
    got = tda.triton_decode_attention(q, k, v, tables, lens, int(lens.max()), scale, prefix=prefix,
                                      unified_max=0.0 if unified else None)
    assert (got - expected).abs().max().item() < 1e-4


def test_unified_max_matches_and_falls_back_in_interpreter():
    interpreter_only()
    batch, heads, kv_heads, head_dim, block_size, lens = 4, 4, 2, 16, 4, [5, 37, 70, 20]
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, torch.float32, "cpu")
    scale = head_dim**-0.5
    q[1] *= 200.0  # row 1's scores rise far above phi: exp would overflow, so it must fall back
    expected = decode_attention(q, k, v, tables, seq_lens, max(lens), scale)
    flags = torch.zeros(batch, heads, dtype=torch.int32)
    got = tda.triton_decode_attention(q, k, v, tables, seq_lens, max(lens), scale, unified_max=0.0,
                                      fallback_flags=flags)
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() < 1e-4
    assert flags[1].all() and not flags[[0, 2, 3]].any()
    # phi far above the ordinary rows' scores: they would underflow, so they take the exact path.
    got = tda.triton_decode_attention(q, k, v, tables, seq_lens, max(lens), scale, unified_max=500.0,
                                      fallback_flags=flags)
    assert (got - expected).abs().max().item() < 1e-4
    assert flags[[0, 2, 3]].all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("members,prefix_len,group", [(16, 4096, 4), (5, 512, 2), (20, 1024, 1)])
def test_cascade_and_unified_on_gpu(dtype, members, prefix_len, group, pipelining):
    kv_heads = 8 if group > 1 else 4
    q, k, v, tables, lens, prefix = shared_prefix_case(members, prefix_len, [1 + 7 * i for i in range(members)],
                                                      kv_heads * group, kv_heads, 128, 16, dtype, "cuda")
    scale = 128**-0.5
    expected = decode_attention(q.float(), k.float(), v.float(), tables, lens, int(lens.max()), scale)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for unified in (None, 0.0):
        flags = torch.zeros(q.shape[0], q.shape[1], dtype=torch.int32, device="cuda")
        for groups in (None, prefix):
            got = tda.triton_decode_attention(q, k, v, tables, lens, int(lens.max()), scale, unified_max=unified,
                                              prefix=groups, fallback_flags=flags).float()
            assert ((got - expected).norm() / expected.norm()).item() < tolerance
        if unified is not None:
            q_hot = q.clone()
            q_hot[0] *= 300  # scores far above phi: row 0 takes the exact fallback
            hot_expected = decode_attention(q_hot.float(), k.float(), v.float(), tables, lens, int(lens.max()), scale)
            got = tda.triton_decode_attention(q_hot, k, v, tables, lens, int(lens.max()), scale, unified_max=unified,
                                              prefix=prefix, fallback_flags=flags).float()
            # Peaked softmax (scores x300) amplifies rounding: a looser bound for this row.
            assert ((got - hot_expected).norm() / hot_expected.norm()).item() < max(tolerance, 1e-4)
            assert flags[0].all() and not flags[1:].any()


def brute_force_window(q, k, v, tables, seq_lens, scale, window):
    """Each row's last `window` cached positions gathered one by one, plain softmax."""
    block_size, out = k.shape[1], torch.empty_like(q)
    group = q.shape[1] // k.shape[2]
    for b, n in enumerate(seq_lens.tolist()):
        positions = range(max(0, n - window), n)
        slots = [(int(tables[b, p // block_size]), p % block_size) for p in positions]
        keys = torch.stack([k[blk, off] for blk, off in slots]).repeat_interleave(group, dim=1)  # [L, H, D]
        values = torch.stack([v[blk, off] for blk, off in slots]).repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[b], keys) * scale, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, values)
    return out


WINDOWS = [1, 5, 16, 37, 70, 1000]  # 70 and 1000 reach past every context: full attention


@pytest.mark.parametrize("window", WINDOWS)
def test_reference_window_is_the_last_positions(window):
    q, k, v, tables, seq_lens = make_case(3, 4, 2, 16, 4, [1, 37, 70], torch.float32, "cpu")
    got = decode_attention(q, k, v, tables, seq_lens, 70, 0.25, window=window)
    assert (got - brute_force_window(q, k, v, tables, seq_lens, 0.25, window)).abs().max().item() < 1e-5
    if window >= 70:
        assert torch.equal(got, decode_attention(q, k, v, tables, seq_lens, 70, 0.25))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("unified", [None, 0.0, 500.0])  # synchronized; unified; unified, every row falls back
def test_window_kernel_matches_reference_in_interpreter(window, unified, pipelining):
    interpreter_only()
    q, k, v, tables, seq_lens = make_case(3, 4, 2, 16, 4, [1, 37, 70], torch.float32, "cpu")
    expected = decode_attention(q, k, v, tables, seq_lens, 70, 0.25, window=window)
    flags = torch.zeros(3, 4, dtype=torch.int32)
    got = tda.triton_decode_attention(q, k, v, tables, seq_lens, 70, 0.25, window=window, unified_max=unified,
                                      fallback_flags=flags)
    assert (got - expected).abs().max().item() < 1e-4
    if unified == 500.0:
        assert flags.all()  # the exact fallback ran for every row, and honoured the window too


def test_window_with_cascade_groups_is_refused():
    q, k, v, tables, lens, prefix = shared_prefix_case(3, 32, [1, 9, 17], 4, 2, 16, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="sliding window"):
        tda.triton_decode_attention(q, k, v, tables, lens, int(lens.max()), 0.25, prefix=prefix, window=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [16, 500, 4096])
def test_window_on_gpu(dtype, window, pipelining):
    lens = [5, 900, 33, 2048]
    q, k, v, tables, seq_lens = make_case(4, 14, 2, 64, 16, lens, dtype, "cuda")
    expected = decode_attention(q.float(), k.float(), v.float(), tables, seq_lens, max(lens), 0.125, window=window)
    got = tda.triton_decode_attention(q, k, v, tables, seq_lens, max(lens), 0.125, window=window).float()
    assert ((got - expected).norm() / expected.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


# ----------------------------------------------------------------------------- 8-bit KV cache


def fp8_caches(k, v):
    return FP8KVCache(*quantize_fp8(k)), FP8KVCache(*quantize_fp8(v))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("unified", [None, 0.0, 500.0])  # synchronized; unified; unified, every row falls back
def test_fp8_kernel_matches_reference_in_interpreter(case, unified, pipelining):
    """fp8 codes + scales through the split kernel (and the unified-max fallback in the merge
    kernel) against the PyTorch twin on the same fp8 cache."""
    interpreter_only()
    batch, heads, kv_heads, head_dim, block_size, lens = case
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, torch.float32, "cpu")
    kf, vf = fp8_caches(k * 40, v)  # large keys: a scale of 1 would saturate them
    expected = decode_attention(q, kf, vf, tables, seq_lens, max(lens), head_dim**-0.5)
    flags = torch.zeros(batch, heads, dtype=torch.int32)
    got = tda.triton_decode_attention(q, kf, vf, tables, seq_lens, max(lens), head_dim**-0.5, unified_max=unified,
                                      fallback_flags=flags)
    assert (got - expected).abs().max().item() < 1e-4
    if unified == 500.0:
        assert flags.all()


@pytest.mark.parametrize("window", [None, 5])
def test_fp8_cascade_and_window_kernels_match_reference_in_interpreter(window, pipelining):
    interpreter_only()
    q, k, v, tables, lens, prefix = shared_prefix_case(3, 32, [1, 9, 17], 4, 2, 16, 4, torch.float32, "cpu")
    kf, vf = fp8_caches(k, v)
    expected = decode_attention(q, kf, vf, tables, lens, int(lens.max()), 0.25, window=window)
    got = tda.triton_decode_attention(q, kf, vf, tables, lens, int(lens.max()), 0.25, window=window,
                                      prefix=prefix if window is None else None)
    assert (got - expected).abs().max().item() < 1e-4


def head_major(cache: FP8KVCache) -> FP8KVCache:
    """The same cache with its scales stored [blocks, kv_heads, block_size] (the engine's layout:
    one head's scales of a block side by side), viewed as [blocks, block_size, kv_heads]."""
    return FP8KVCache(cache.codes, cache.scales.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.parametrize("case", CASES)
def test_fp8_head_major_scales_match_reference_in_interpreter(case):
    interpreter_only()
    batch, heads, kv_heads, head_dim, block_size, lens = case
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, torch.float32, "cpu")
    kf, vf = fp8_caches(k * 40, v)
    expected = decode_attention(q, kf, vf, tables, seq_lens, max(lens), head_dim**-0.5)
    moved_k, moved_v = head_major(kf), head_major(vf)
    assert moved_k.scales.stride() != kf.scales.stride() or kv_heads == 1  # one KV head: the same layout
    got = tda.triton_decode_attention(q, moved_k, moved_v, tables, seq_lens, max(lens), head_dim**-0.5)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unified", [None, 0.0, 500.0])
def test_fp8_fp16_path_for_16_bit_queries_in_interpreter(dtype, unified, pipelining):
    """16-bit queries on an fp8 cache: q scaled into fp16 by its row's largest magnitude, codes
    to fp16, the V scale folded into p under the synchronized softmax (so a requested unified
    max is not used and no row is flagged). Large queries (bf16 5e4: past fp16's range, squared
    against large keys; fp16 queries 1e4, near their own range) must not overflow; cascade
    groups too."""
    interpreter_only()
    batch, heads, kv_heads, head_dim, block_size, lens = CASES[0]
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, torch.float32, "cpu")
    kf, vf = fp8_caches(k * 40, v * 1000)
    for magnitude in (1.0, 5e4 if dtype == torch.bfloat16 else 1e4):
        query = (q * magnitude).to(dtype)
        expected = decode_attention(query.float(), kf, vf, tables, seq_lens, max(lens), head_dim**-0.5)
        flags = torch.ones(batch, heads, dtype=torch.int32)
        got = tda.triton_decode_attention(query, head_major(kf), head_major(vf), tables, seq_lens, max(lens),
                                          head_dim**-0.5, unified_max=unified, fallback_flags=flags)
        assert got.dtype == dtype and torch.isfinite(got).all()
        rel = ((got.float() - expected).norm() / expected.norm()).item()
        assert rel < 1e-2, (magnitude, rel)
        assert not flags.any()
    q, k, v, tables, lens, prefix = shared_prefix_case(3, 32, [1, 9, 17], 4, 2, 16, 4, torch.float32, "cpu")
    kf, vf = fp8_caches(k, v)
    expected = decode_attention(q, kf, vf, tables, lens, int(lens.max()), 0.25)
    got = tda.triton_decode_attention(q.to(dtype), kf, vf, tables, lens, int(lens.max()), 0.25, prefix=prefix)
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2
    assert tda._fp16_path_failure is None  # the fp16 path itself ran, not the conversion path after a failure


def test_fp8_v_codes_are_read_as_words_only_when_aligned(monkeypatch):
    """The fp16 path reads V codes as int32 words only from a 4-byte-aligned cache; codes at
    an odd address take the byte loads, with the same results."""
    interpreter_only()
    q, k, v, tables, seq_lens = make_case(3, 4, 2, 16, 4, [1, 37, 70], torch.float32, "cpu")
    kf, vf = fp8_caches(k, v)
    expected = decode_attention(q, kf, vf, tables, seq_lens, 70, 0.25)
    storage = torch.zeros(vf.codes.numel() + 1, dtype=torch.uint8)
    storage[1:] = vf.codes.view(torch.uint8).flatten()
    odd = FP8KVCache(storage[1:].view(vf.codes.shape).view(torch.float8_e4m3fn), vf.scales)
    assert odd.codes.data_ptr() % 4
    real, seen = tda._decode_split_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["V_WORDS"])
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tda, "_decode_split_kernel", Spy())
    for cache, words in ((vf, True), (odd, False)):
        got = tda.triton_decode_attention(q.bfloat16(), kf, cache, tables, seq_lens, 70, 0.25)
        assert seen[-1] is words
        assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2
    assert tda._fp16_path_failure is None


def test_e4m3_decoder_of_the_evaluator_matches_torch():
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
    for code, value in enumerate(values):
        assert (math.isnan(value) and math.isnan(e4m3(code))) or e4m3(code) == value, code


def test_e4m3_to_fp16_ptx_every_code_in_every_byte():
    """The GPU path's PTX (four codes of a word -> four fp16, in memory order), run by the
    evaluator: every code in every byte position, beside random neighbours. The evaluator's
    model of cvt's lane order (low byte -> low half) is checked against silicon only by the
    GPU tests."""
    rng = np.random.default_rng(0)
    for code in range(256):
        for position in range(4):
            codes = [int(c) for c in rng.integers(0, 256, 4)]
            codes[position] = code
            word = codes[0] | codes[1] << 8 | codes[2] << 16 | codes[3] << 24
            halves = run_ptx(tda.E4M3X4_TO_F16, [word], 4)
            for got, c in zip(halves, codes):
                expected = np.float16(e4m3(c))
                assert (np.isnan(expected) and np.isnan(f16(got))) or f16(got) == expected, (code, position)


def test_fp8_cache_with_mismatched_scales_is_refused():
    q, k, v, tables, seq_lens = make_case(2, 4, 2, 16, 4, [5, 9], torch.float32, "cpu")
    kf, vf = fp8_caches(k, v)
    with pytest.raises(ValueError, match="fp8 KV cache layout"):  # K's scales head-major, V's not
        tda.triton_decode_attention(q, head_major(kf), vf, tables, seq_lens, 9, 0.25)
    with pytest.raises(ValueError, match="fp8 KV cache layout"):  # scales of the wrong shape
        tda.triton_decode_attention(q, FP8KVCache(kf.codes, kf.scales[:, :2]), vf, tables, seq_lens, 9, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 (compute capability 8.9+)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unified", [None, 0.0])
@pytest.mark.parametrize("case", CASES + [(64, 32, 8, 128, 16, [4096] * 64), (4, 14, 2, 64, 16, [5, 900, 33, 2048])])
def test_fp8_matches_reference_on_gpu(case, dtype, unified, pipelining):
    batch, heads, kv_heads, head_dim, block_size, lens = case
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, dtype, "cuda")
    kf, vf = fp8_caches(k * 40, v)
    expected = decode_attention(q.float(), kf, vf, tables, seq_lens, max(lens), head_dim**-0.5)
    got = tda.triton_decode_attention(q, kf, vf, tables, seq_lens, max(lens), head_dim**-0.5,
                                      unified_max=unified).float()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2)


def test_fp8_fp16_path_that_fails_to_build_falls_back_once(monkeypatch):
    """If the fp16 path cannot be compiled on this GPU/Triton, the call (and every later one)
    takes the conversion path with one warning, instead of failing every decode step."""
    interpreter_only()
    real = tda._decode_split_kernel

    class Refuses16:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["F16"]:
                    raise RuntimeError("simulated compiler failure")
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tda, "_decode_split_kernel", Refuses16())
    monkeypatch.setattr(tda, "_fp16_path_failure", None)
    monkeypatch.setitem(tda.FP8_DECODE_PATHS, "16-bit queries", tda.FP8_DECODE_PATHS["16-bit queries"])
    batch, heads, kv_heads, head_dim, block_size, lens = CASES[0]
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, torch.float32, "cpu")
    kf, vf = fp8_caches(k, v)
    expected = decode_attention(q, kf, vf, tables, seq_lens, max(lens), head_dim**-0.5)
    query = q.to(torch.float16)
    with pytest.warns(RuntimeWarning, match="fp16 path of the fp8 KV decode kernel failed"):
        got = tda.triton_decode_attention(query, kf, vf, tables, seq_lens, max(lens), head_dim**-0.5)
    assert "simulated compiler failure" in tda._fp16_path_failure
    # The run metadata (which holds this dict) says so too.
    assert tda.FP8_DECODE_PATHS["16-bit queries"].startswith("conversion path (the fp16 path failed: RuntimeError")
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the failure is remembered
        again = tda.triton_decode_attention(query, kf, vf, tables, seq_lens, max(lens), head_dim**-0.5)
    assert torch.equal(again, got)
