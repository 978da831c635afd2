"""Fused Triton kernels against their PyTorch twins (CPU: TRITON_INTERPRET=1; GPU: real shapes)."""

from __future__ import annotations

import os

import pytest
import torch

from thinkwise.kernels import fused

pytestmark = pytest.mark.skipif(fused.triton is None, reason="triton is not installed")


def run_triton_on(device):
    """The kernels dispatch to Triton only for CUDA tensors; under the interpreter force it."""
    if device == "cpu":
        if torch.cuda.is_available():
            pytest.skip("the GPU tests cover CUDA")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("set TRITON_INTERPRET=1 (the test suite's conftest does) to run Triton on CPU")


@pytest.fixture()
def force_triton(monkeypatch):
    monkeypatch.setattr(fused, "_use_triton", lambda x: True)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tolerance(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 96), (3, 896)])
def test_add_rms_norm(force_triton, device, dtype, rows, cols):
    run_triton_on(device)
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g).to(dtype).to(device)
    residual = torch.randn(rows, cols, generator=g).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(cols, generator=g)).to(dtype).to(device)
    expected, expected_residual = fused.add_rms_norm_reference(x, residual.clone(), weight, 1e-6)
    got, got_residual = fused.add_rms_norm(x, residual.clone(), weight, 1e-6)
    torch.testing.assert_close(got, expected, **tolerance(dtype))
    torch.testing.assert_close(got_residual, expected_residual, **tolerance(dtype))
    alone, _ = fused.add_rms_norm(x, None, weight, 1e-6)
    torch.testing.assert_close(alone, fused.rms_norm_reference(x, weight, 1e-6), **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (2, 1, 64)])
def test_qkv_rotary_cache(force_triton, device, dtype, qk_norm, heads, kv_heads, head_dim):
    run_triton_on(device)
    from thinkwise.models.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(heads * head_dim + qk_norm)
    tokens, block_size, blocks = 5, 4, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(device)
    rotary = RotaryEmbedding(head_dim, 10000.0, None, max_positions=64).to(device)
    cos, sin = rotary.cos_sin(torch.tensor([0, 3, 7, 8, 30], device=device), dtype)
    both = torch.stack((cos, sin), dim=1)  # the GPU table's layout: rows of [cos; sin], strided views
    cos, sin = both[:, 0], both[:, 1]
    weights = [(1 + 0.1 * torch.randn(head_dim, generator=g)).to(dtype).to(device) for _ in range(2)] if qk_norm \
        else [None, None]
    slots = torch.tensor([2, 9, 10, 17, 23], device=device)
    caches = [torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(4)]
    expected_q = fused.qkv_rotary_cache_reference(qkv, cos, sin, *weights, 1e-6, caches[0], caches[1], slots,
                                                  heads, kv_heads, head_dim)
    got_q = fused.qkv_rotary_cache(qkv, cos, sin, *weights, 1e-6, caches[2], caches[3], slots,
                                   heads, kv_heads, head_dim)
    torch.testing.assert_close(got_q, expected_q, **tolerance(dtype))
    torch.testing.assert_close(caches[2], caches[0], **tolerance(dtype))
    torch.testing.assert_close(caches[3], caches[1], **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (3, 1100)])
def test_silu_mul(force_triton, device, dtype, rows, cols):
    run_triton_on(device)
    gate_up = torch.randn(rows, 2 * cols, generator=torch.Generator().manual_seed(cols)).to(dtype).to(device)
    torch.testing.assert_close(fused.silu_mul(gate_up), fused.silu_mul_reference(gate_up), **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (3, 1100)])
def test_gelu_tanh_gate(force_triton, device, dtype, rows, cols):
    """Gemma's gated activation: the kernel equals transformers' gelu_pytorch_tanh(gate) * up."""
    from transformers.activations import ACT2FN

    run_triton_on(device)
    gate_up = 3 * torch.randn(rows, 2 * cols, generator=torch.Generator().manual_seed(cols)).to(dtype).to(device)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = ACT2FN["gelu_pytorch_tanh"](gate) * up
    torch.testing.assert_close(fused.gated_activation(gate_up, "gelu_tanh"), expected, **tolerance(dtype))
    torch.testing.assert_close(fused.gated_activation_reference(gate_up, "gelu_tanh"), expected, rtol=0, atol=0)


def test_unknown_gated_activation_is_refused():
    with pytest.raises(ValueError, match="relu.*known: silu, gelu_tanh"):
        fused.gated_activation(torch.zeros(1, 4), "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_table_rows_are_the_computed_values(dtype):
    from thinkwise.models.rotary import RotaryEmbedding

    rotary = RotaryEmbedding(128, 1e6, None, max_positions=4096)
    positions = torch.tensor([0, 1, 17, 255, 4095])
    rotary.cos_sin(positions, dtype)
    assert not rotary._tables  # CPU computes from the positions present: no full-context table
    if not torch.cuda.is_available():
        return
    rotary = rotary.to("cuda")
    positions = positions.cuda()
    cos, sin = rotary.cos_sin(positions, dtype)
    assert len(rotary._tables) == 1 and cos.stride(0) == 2 * 128
    expected_cos, expected_sin = rotary._compute(positions, dtype)
    assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)  # bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("head_major", [False, True])
def test_qkv_rotary_cache_into_an_fp8_cache(force_triton, device, dtype, qk_norm, head_major):
    """The kernel quantizes K and V into an fp8 cache (codes + a scale per token and head) as
    the twin's write_kv_cache does: the same scales, codes at most one e4m3 step apart (the
    kernel's rotary rounds once, the twin's per op), untouched slots left alone. With
    `head_major` the kernel's and the twin's caches store their scales [blocks, kv_heads,
    block_size] (the engine's layout); the twin's must equal a token-major twin's exactly."""
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    run_triton_on(device)
    from thinkwise.kernels.paged_attention import FP8KVCache, dequantize_fp8
    from thinkwise.models.rotary import RotaryEmbedding

    heads, kv_heads, head_dim, tokens, block_size, blocks = 4, 2, 32, 5, 4, 6
    g = torch.Generator().manual_seed(11)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g) * 600).to(dtype).to(device)
    cos, sin = RotaryEmbedding(head_dim, 10000.0, None, max_positions=64).to(device).cos_sin(
        torch.tensor([0, 3, 7, 8, 30], device=device), dtype)
    weights = [(1 + 0.1 * torch.randn(head_dim, generator=g)).to(dtype).to(device) for _ in range(2)] if qk_norm \
        else [None, None]
    slots = torch.tensor([2, 9, 10, 17, 23], device=device)

    def fp8_cache(head_major=head_major):
        scales = torch.zeros(blocks, kv_heads, block_size, device=device).transpose(1, 2) if head_major \
            else torch.zeros(blocks, block_size, kv_heads, device=device)
        return FP8KVCache(torch.zeros(blocks, block_size, kv_heads, head_dim, dtype=torch.float8_e4m3fn,
                                      device=device), scales)

    expected, got = (fp8_cache(), fp8_cache()), (fp8_cache(), fp8_cache())
    fused.qkv_rotary_cache_reference(qkv, cos, sin, *weights, 1e-6, *expected, slots, heads, kv_heads, head_dim)
    fused.qkv_rotary_cache(qkv, cos, sin, *weights, 1e-6, *got, slots, heads, kv_heads, head_dim)
    if head_major:
        plain = (fp8_cache(False), fp8_cache(False))
        fused.qkv_rotary_cache_reference(qkv, cos, sin, *weights, 1e-6, *plain, slots, heads, kv_heads, head_dim)
        for laid, flat in zip(expected, plain):
            assert laid.scales.stride() != flat.scales.stride()
            assert torch.equal(laid.scales, flat.scales) and torch.equal(laid.codes.view(torch.uint8),
                                                                         flat.codes.view(torch.uint8))
    for want, have in zip(expected, got):
        torch.testing.assert_close(have.scales, want.scales, **tolerance(dtype))
        values, wanted = dequantize_fp8(have.codes, have.scales), dequantize_fp8(want.codes, want.scales)
        step = want.scales[..., None] * 32  # one e4m3 step at the top binade (256..448) x scale
        # One step exactly is allowed: the slack only absorbs the fp32 rounding of the two
        # dequantized products (an H100 gave codes 249 vs 250: 103.43 against a step of 103.43).
        assert ((values - wanted).abs() <= step * (1 + 1e-5) + 1e-6).all()
        written = [c.view(torch.uint8).reshape(-1, kv_heads, head_dim)[slots] for c in (have.codes, want.codes)]
        same = (written[0] == written[1]).float().mean().item()
        # A code differs only where the rotary rounded differently (observed: fp32 97.5-100% equal,
        # bf16 93-100%).
        assert same > (0.95 if dtype == torch.float32 else 0.9), same
        assert (have.scales.reshape(-1, kv_heads)[[0, 1, 3]] == 0).all()  # slots nobody wrote
