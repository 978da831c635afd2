"""The C++ CPU decode operators (kernels/cpu_decode_ops) against their PyTorch twins.

The element-wise groups round where the twins round, so bf16 results must be identical
except where fp32 summation order moves a norm's mean by an ulp (allowed on a handful of
elements, never more than one bf16 ulp); attention differs from the twin by fp32 rounding
only. Hostile inputs (slots and blocks outside the cache, tables too short) must raise, not
write or read outside the tensors. The dispatch tests check which path the model code takes.
"""

from __future__ import annotations

import pytest
import torch

from thinkwise.kernels import cpu_decode_ops, fused, paged_attention
from thinkwise.kernels.paged_attention import FP8KVCache, quantize_fp8

pytestmark = pytest.mark.skipif(not cpu_decode_ops.available(),
                                reason=f"CPU decode operators unavailable: {cpu_decode_ops.status()['reason']}")

DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def assert_within_one_ulp(got: torch.Tensor, expected: torch.Tensor, max_fraction: float = 0.01):
    """Equal, except a few elements (summation order of a mean) one step of the dtype apart;
    in float32, where no rounding to a narrower type hides it, within a few float32 ulps."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        return
    differ = got != expected
    if not differ.any():
        return
    assert differ.float().mean().item() <= max_fraction, f"{differ.sum().item()} of {differ.numel()} differ"
    bits = torch.int16
    steps = (got.view(bits).int() - expected.view(bits).int()).abs()
    assert steps[differ].max().item() <= 1, "an element differs by more than one ulp"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 896), (3, 64), (9, 1000)])
def test_add_rms_norm_matches_the_twin(dtype, rows, cols):
    g = torch.Generator().manual_seed(rows + cols)
    x = (3 * torch.randn(rows, cols, generator=g)).to(dtype)
    residual = torch.randn(rows, cols, generator=g).to(dtype)
    weight = (1 + 0.3 * torch.randn(cols, generator=g)).to(dtype)
    expected, expected_residual = fused.add_rms_norm_reference(x, residual.clone(), weight, 1e-6)
    into = residual.clone()
    got, got_residual = cpu_decode_ops.add_rms_norm(x, into, weight, 1e-6)
    assert torch.equal(got_residual, expected_residual) and got_residual.data_ptr() == into.data_ptr()
    assert_within_one_ulp(got, expected)
    alone, same = cpu_decode_ops.add_rms_norm(x, None, weight, 1e-6)
    assert same is x
    assert_within_one_ulp(alone, fused.rms_norm_reference(x, weight, 1e-6))


def rotary_inputs(dtype, tokens, heads, kv_heads, head_dim, seed=0):
    from thinkwise.models.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)).to(dtype)
    positions = torch.randint(0, 500, (tokens,), generator=g)
    cos, sin = RotaryEmbedding(head_dim, 10000.0, None, 1024).cos_sin(positions, dtype)
    norms = [(1 + 0.2 * torch.randn(head_dim, generator=g)).to(dtype) for _ in range(2)]
    cache_shape = (6, 4, kv_heads, head_dim)
    slots = torch.randperm(24, generator=g)[:tokens]
    return qkv, cos, sin, norms, cache_shape, slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 14, 2, 64), (5, 4, 4, 32), (3, 8, 1, 128)])
def test_qkv_rotary_cache_matches_the_twin(dtype, qk_norm, tokens, heads, kv_heads, head_dim):
    qkv, cos, sin, (qn, kn), shape, slots = rotary_inputs(dtype, tokens, heads, kv_heads, head_dim)
    qn, kn = (qn, kn) if qk_norm else (None, None)
    caches = [torch.full(shape, 7.0, dtype=dtype) for _ in range(4)]
    expected = fused.qkv_rotary_cache_reference(qkv, cos, sin, qn, kn, 1e-6, caches[0], caches[1], slots,
                                                heads, kv_heads, head_dim)
    got = cpu_decode_ops.qkv_rotary_cache(qkv, cos, sin, qn, kn, 1e-6, caches[2], caches[3], slots,
                                          heads, kv_heads, head_dim)
    assert_within_one_ulp(got, expected)
    assert_within_one_ulp(caches[2], caches[0])
    assert torch.equal(caches[3], caches[1])  # v is copied as it is; untouched slots keep their 7.0


def paged_context(dtype, batch, kv_heads, head_dim, block_size=4, num_blocks=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    lengths = torch.randint(1, 30, (batch,), generator=g)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:8] for _ in range(batch)])
    return k_cache, v_cache, tables, lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(14, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_the_twin(dtype, heads, kv_heads, window):
    batch, head_dim = 5, 64
    k_cache, v_cache, tables, lengths = paged_context(dtype, batch, kv_heads, head_dim)
    query = (3 * torch.randn(batch, heads, head_dim, generator=torch.Generator().manual_seed(1))).to(dtype)
    args = (query, k_cache, v_cache, tables, lengths, int(lengths.max()), head_dim**-0.5)
    expected = paged_attention.decode_attention(*args, window=window)
    got = cpu_decode_ops.decode_attention(*args, window=window)
    assert got.dtype == dtype and got.shape == expected.shape
    step = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=step, rtol=step)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [20, 24, 40, 96, 128])
@pytest.mark.parametrize("window", [None, 37])
def test_decode_attention_over_many_chunks_and_head_dims(dtype, head_dim, window):
    """Contexts of several 32-position chunks (short last chunks, block edges inside a chunk)
    and head sizes for each path of the dot products and the weighted sum: 8-row dots or
    not (a multiple of 8 or not), 64- and 32-column slabs and a remainder."""
    g = torch.Generator().manual_seed(head_dim)
    batch, heads, kv_heads, block_size, num_blocks = 4, 6, 2, 5, 60
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    lengths = torch.tensor([1, 33, 97, 150])  # one position; a chunk and one; 3 chunks + 1; 4 chunks + 22
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:30] for _ in range(batch)])
    query = (3 * torch.randn(batch, heads, head_dim, generator=g)).to(dtype)
    args = (query, k_cache, v_cache, tables, lengths, int(lengths.max()), head_dim**-0.5)
    expected = paged_attention.decode_attention(*args, window=window)
    got = cpu_decode_ops.decode_attention(*args, window=window)
    step = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=step, rtol=step)


def test_decode_attention_split_over_threads_gives_the_same_bits():
    """A long context (past the size where the (sequence, KV head) jobs go to several threads:
    the library is built with OpenMP for that) gives exactly the one-thread result, and the twin's."""
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_size = 14, 2, 64, 16
    k_cache = torch.randn(64, block_size, kv_heads, head_dim, generator=g).bfloat16()
    v_cache = torch.randn(64, block_size, kv_heads, head_dim, generator=g).bfloat16()
    lengths = torch.tensor([1000])
    tables = torch.randperm(64, generator=g)[None, :63]
    query = torch.randn(1, heads, head_dim, generator=g).bfloat16()
    args = (query, k_cache, v_cache, tables, lengths, 1000, head_dim**-0.5)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = cpu_decode_ops.decode_attention(*args)
        torch.set_num_threads(2)
        assert torch.equal(cpu_decode_ops.decode_attention(*args), alone)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(alone.float(), paged_attention.decode_attention(*args).float(), atol=8e-3, rtol=8e-3)


def test_decode_attention_ignores_cascade_groups_with_the_same_result():
    k_cache, v_cache, tables, lengths = paged_context(torch.float32, 4, 2, 32)
    tables[1, :2] = tables[0, :2]  # rows 0 and 1 share their first 8 tokens
    lengths[:2] = torch.tensor([20, 17])
    query = torch.randn(4, 4, 32)
    prefix = paged_attention.pack_prefix_groups([[0, 1]], [8], 4, "cpu")
    args = (query, k_cache, v_cache, tables, lengths, int(lengths.max()), 0.2)
    torch.testing.assert_close(cpu_decode_ops.decode_attention(*args, prefix=prefix),
                               paged_attention.decode_attention(*args, prefix=prefix), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_the_twin(dtype):
    x = torch.linspace(-87.5, 87.5, 40001).to(dtype)  # every bf16 value in range, several times
    gate_up = torch.stack([torch.cat([x, torch.ones_like(x)]), torch.cat([x.flip(0), x])])
    assert_within_one_ulp(fused.silu_mul(gate_up), fused.silu_mul_reference(gate_up), max_fraction=0.001)
    strided = torch.randn(3, 2 * 4864).to(dtype)[:, :]  # a view with row stride 2 * cols
    assert_within_one_ulp(cpu_decode_ops.silu_mul(strided), fused.silu_mul_reference(strided), max_fraction=0.001)


# ----------------------------------------------------------------------------- hostile inputs


def test_slots_outside_the_cache_are_refused_before_any_write():
    qkv, cos, sin, _, shape, slots = rotary_inputs(torch.float32, 3, 4, 2, 32)
    k_cache, v_cache = torch.zeros(shape), torch.zeros(shape)
    for bad in (24, -1, 10**12):
        bad_slots = slots.clone()
        bad_slots[-1] = bad
        with pytest.raises(RuntimeError, match="outside the cache"):
            cpu_decode_ops.qkv_rotary_cache(qkv, cos, sin, None, None, 1e-6, k_cache, v_cache, bad_slots, 4, 2, 32)
    assert not k_cache.any() and not v_cache.any()


def test_block_tables_that_point_outside_the_cache_are_refused():
    k_cache, v_cache, tables, lengths = paged_context(torch.float32, 2, 2, 32)
    query = torch.randn(2, 4, 32)
    bad = tables.clone()
    bad[0, 0] = 40
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_decode_ops.decode_attention(query, k_cache, v_cache, bad, lengths, 30, 0.2)
    too_long = lengths.clone()
    too_long[1] = 8 * 4 + 1
    with pytest.raises(RuntimeError, match="more than its block table holds"):
        cpu_decode_ops.decode_attention(query, k_cache, v_cache, tables, too_long, 33, 0.2)


def test_mismatched_shapes_and_dtypes_are_refused():
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.thinkwise_cpu_decode.add_rms_norm(x, None, torch.randn(63), 1e-6)
    with pytest.raises(RuntimeError, match="gate_up must be"):
        cpu_decode_ops.silu_mul(torch.randn(2, 5))
    k_cache, v_cache, tables, lengths = paged_context(torch.float32, 2, 2, 32)
    with pytest.raises(RuntimeError, match="caches must be"):
        cpu_decode_ops.decode_attention(torch.randn(2, 4, 32, dtype=torch.bfloat16), k_cache, v_cache, tables,
                                        lengths, 30, 0.2)


# ----------------------------------------------------------------------------- which path runs


def spy(monkeypatch, name):
    calls = []
    original = getattr(cpu_decode_ops, name)
    monkeypatch.setattr(cpu_decode_ops, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


def test_the_model_code_takes_the_operators_on_cpu_and_the_twins_when_fused_kernels_are_off(monkeypatch):
    norm_calls = spy(monkeypatch, "add_rms_norm")
    silu_calls = spy(monkeypatch, "silu_mul")
    x, weight = torch.randn(2, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16)
    fused.add_rms_norm(x, None, weight, 1e-6)
    fused.gated_activation(torch.randn(2, 64, dtype=torch.bfloat16), "silu")
    fused.gated_activation(torch.randn(2, 64, dtype=torch.bfloat16), "gelu_tanh")  # not ours: the twin
    assert norm_calls == ["add_rms_norm"] and silu_calls == ["silu_mul"]
    monkeypatch.setattr(fused, "FUSED", False)
    fused.add_rms_norm(x, None, weight, 1e-6)
    fused.gated_activation(torch.randn(2, 64, dtype=torch.bfloat16), "silu")
    assert norm_calls == ["add_rms_norm"] and silu_calls == ["silu_mul"]
    mixed = fused.add_rms_norm(x, None, weight.float(), 1e-6)[0]  # dtypes differ: the twin promotes
    assert mixed.dtype == torch.float32 and norm_calls == ["add_rms_norm"]


def test_attention_takes_the_operator_unless_the_backend_is_torch_or_the_cache_fp8(monkeypatch):
    k_cache, v_cache, tables, lengths = paged_context(torch.float32, 2, 2, 32)
    query = torch.randn(2, 4, 32)
    assert paged_attention._decode_backend(query, k_cache, v_cache) is cpu_decode_ops.decode_attention
    fp8 = FP8KVCache(*quantize_fp8(k_cache))
    assert paged_attention._decode_backend(query, fp8, fp8) is paged_attention.decode_attention
    monkeypatch.setattr(paged_attention, "ATTENTION_BACKEND", "torch")
    assert paged_attention._decode_backend(query, k_cache, v_cache) is paged_attention.decode_attention


def test_an_unbuildable_library_falls_back_to_the_twins(monkeypatch):
    monkeypatch.setattr(cpu_decode_ops._library, "_status", {"available": False, "reason": "no compiler"})
    calls = spy(monkeypatch, "add_rms_norm")
    x, weight = torch.randn(2, 64), torch.ones(64)
    out, _ = fused.add_rms_norm(x, None, weight, 1e-6)
    assert calls == [] and torch.equal(out, fused.rms_norm_reference(x, weight, 1e-6))
    k_cache, v_cache, _, _ = paged_context(torch.float32, 2, 2, 32)
    assert paged_attention._decode_backend(torch.randn(2, 4, 32), k_cache, v_cache) is paged_attention.decode_attention
    assert cpu_decode_ops.record() == {"operators": "pytorch twins", "why": "no compiler"}
