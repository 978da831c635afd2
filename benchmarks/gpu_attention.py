"""Decode attention alone: the Triton split-KV kernel vs PyTorch SDPA on the same paged data.

For each (batch, context) it builds a paged bf16 KV cache with shuffled blocks (as a
running engine has) for a Llama-3-8B layer (32 query heads, 8 KV heads, head_dim 128)
and times, with CUDA events, one decode-attention call of:
  - thinkwise's Triton kernel, synchronized softmax and FlashDecoding++ unified max;
  - PyTorch SDPA as a paged-cache user must call it: gather the blocks into contiguous
    K/V, then `scaled_dot_product_attention` (GQA);
  - SDPA alone on pre-gathered contiguous K/V (a stricter bound: no gather at all).
KV-read bandwidth = bytes of K and V the call must read / time (CUDA-graph replay, as in
the engine), next to the device's copy bandwidth. With `--fp8` each row also times the
kernel on the same cache quantized to e4m3 with head-major scales (the engine's fp8 layout;
bytes counted with the scales) and prints fp8 / bf16. Prints ratios; writes a new JSON file
under $OUT or benchmarks/results (or --out).

    python benchmarks/gpu_attention.py [--batches 1,16,64] [--contexts 1024,4096,16384,32768] [--fp8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result
from benchmarks.gpu_throughput import copy_bandwidth
from thinkwise.kernels.paged_attention import FP8KVCache, quantize_fp8
from thinkwise.kernels.triton_decode_attention import triton_decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def paged_cache(batch: int, context: int, kv_heads: int = KV_HEADS):
    """(k_cache, v_cache, block_tables, seq_lens): a random bf16 paged KV cache, [blocks, BLOCK,
    kv_heads, HEAD_DIM] each, every sequence `context` tokens long in shuffled blocks (as a
    running engine's are), on the GPU."""
    num_blocks = batch * (context // BLOCK)
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, context // BLOCK)
    return k_cache, v_cache, tables, torch.full((batch,), context, device="cuda")


def fp8_copy(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[FP8KVCache, FP8KVCache]:
    """The same cache as the engine stores it under kv_cache_dtype="fp8": e4m3 codes with
    head-major per-slot scales."""
    return tuple(FP8KVCache(codes, scales.transpose(1, 2).contiguous().transpose(1, 2))
                 for codes, scales in (quantize_fp8(k_cache), quantize_fp8(v_cache)))


def timed(fn, repeats: int = 20) -> float:
    """GPU seconds per call: the calls are captured in a CUDA graph and replayed, as the
    engine runs them, so Python launch overhead does not hide the kernels' own time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--fp8", action="store_true", help="also time the kernel on an fp8 (e4m3) copy of the cache")
    add_output_arguments(parser, "gpu_attention")
    args = parser.parse_args()
    require_cuda("gpu_attention.py")
    out = output_path(args, "gpu_attention")
    bandwidth = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK},
              "results": []}
    scale = HEAD_DIM**-0.5
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            blocks_per_seq = context // BLOCK
            num_blocks = batch * blocks_per_seq
            if num_blocks * BLOCK * KV_HEADS * HEAD_DIM * 2 * 2 > 24e9:
                continue  # keep the cache under 24 GB
            torch.manual_seed(0)
            k_cache, v_cache, tables, lens = paged_cache(batch, context)
            query = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)

            def ours(unified=None):
                return triton_decode_attention(query, k_cache, v_cache, tables, lens, context, scale,
                                               unified_max=unified)

            def gather():
                keys = k_cache[tables].view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
                values = v_cache[tables].view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
                return keys, values

            def sdpa(keys, values):
                return F.scaled_dot_product_attention(query.unsqueeze(2), keys, values, scale=scale, enable_gqa=True)

            keys, values = gather()
            keys, values = keys.contiguous(), values.contiguous()
            reference = sdpa(keys, values).squeeze(2).float()
            for unified in (None, 0.0):
                error = ((ours(unified).float() - reference).norm() / reference.norm()).item()
                assert error < 1e-2, error
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
            t_sync = timed(lambda: ours(None))
            t_unified = timed(lambda: ours(0.0))
            t_sdpa_paged = timed(lambda: sdpa(*gather()))
            t_sdpa_contiguous = timed(lambda: sdpa(keys, values))
            best = min(t_sync, t_unified)
            row = {"batch": batch, "context": context,
                   "triton_sync_us": round(t_sync * 1e6, 1), "triton_unified_us": round(t_unified * 1e6, 1),
                   "sdpa_paged_us": round(t_sdpa_paged * 1e6, 1), "sdpa_contiguous_us": round(t_sdpa_contiguous * 1e6, 1),
                   "unified_vs_sync": round(t_sync / t_unified, 3),
                   "speedup_vs_sdpa_paged": round(t_sdpa_paged / best, 2),
                   "speedup_vs_sdpa_contiguous": round(t_sdpa_contiguous / best, 2),
                   "kv_read_GBps": round(kv_bytes / best / 1e9, 1),
                   "kv_read_vs_copy_bandwidth": round(kv_bytes / best / bandwidth, 3)}
            if args.fp8:
                fp8_k, fp8_v = fp8_copy(k_cache, v_cache)
                fp8_out = triton_decode_attention(query, fp8_k, fp8_v, tables, lens, context, scale).float()
                row["fp8_error_vs_sdpa"] = round(((fp8_out - reference).norm() / reference.norm()).item(), 4)
                t_fp8 = timed(lambda: triton_decode_attention(query, fp8_k, fp8_v, tables, lens, context, scale))
                fp8_bytes = 2 * batch * context * KV_HEADS * (HEAD_DIM + 4)
                row.update(fp8_us=round(t_fp8 * 1e6, 1), fp8_kv_read_GBps=round(fp8_bytes / t_fp8 / 1e9, 1),
                           fp8_speedup_vs_bf16=round(best / t_fp8, 3))
                del fp8_k, fp8_v
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            del k_cache, v_cache, keys, values
            torch.cuda.empty_cache()
    write_result(out, report)


if __name__ == "__main__":
    main()
