"""The Triton split-KV decode kernel against its PyTorch twin (CPU: TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

from thinkwise.kernels.paged_attention import decode_attention
from thinkwise.kernels import triton_decode_attention as tda

pytestmark = pytest.mark.skipif(not tda.HAVE_TRITON, reason="triton is not installed")


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
def test_matches_reference_in_interpreter(case, monkeypatch):
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
def test_matches_reference_on_gpu(case, dtype):
    batch, heads, kv_heads, head_dim, block_size, lens = case
    q, k, v, tables, seq_lens = make_case(batch, heads, kv_heads, head_dim, block_size, lens, dtype, "cuda")
    expected = decode_attention(q.float(), k.float(), v.float(), tables, seq_lens, max(lens), head_dim**-0.5)
    got = tda.triton_decode_attention(q, k, v, tables, seq_lens, max(lens), head_dim**-0.5).float()
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2)
