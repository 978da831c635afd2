"""Weight-only int8 / int4 GEMV and flat GEMM: every Triton tiling vs bf16 cuBLAS, per shape and M.

For each weight shape [N, K] (Llama-3-8B and Qwen3-0.6B projections and LM heads) and
each M it times y = x @ W.T for the 16-bit weight through cuBLAS (F.linear) and for the
int8 / int4 (group 32 and 128) weights through each tiling of
`thinkwise.kernels.triton_quant_gemm`, the way the engine runs them: calls over enough
distinct weight copies (>= 3 L2 sizes) that reads come from HBM, captured in a CUDA graph
and replayed, timed with CUDA events (median of replays); split-K tilings share one
workspace, as the engine's layers do (results before 20261207b: each call zeroed a fresh
one, a memset more). Every tiling is first checked against the PyTorch twin. Prints, per
shape and M, the best tiling of each method, its achieved bandwidth (bytes the call must
move / time, next to the device's copy bandwidth) and its speed-up over bf16 (the ideal
is the byte ratio: ~2x int8, ~3.2x int4-g32, ~3.8x int4-g128). `--sweep wide` also times
a wider grid of tilings than the engine offers. Writes a new JSON file under $OUT or
benchmarks/results (or --out).

    python benchmarks/gpu_quant_gemm.py [--shapes llama3-8b,qwen3-0.6b] [--rows 1,64] [--sweep default|wide|weight_b]
        [--projections qkv,o,gate_up,down,lm_head]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result
from benchmarks.gpu_throughput import copy_bandwidth
from thinkwise.kernels import triton_quant_gemm as tq
from thinkwise.kernels.linear_dispatch import GRAPH_BYTES, L2_SWEEP, MAX_GRAPH_CALLS, cuda_graph_time_us
from thinkwise.kernels.linear_methods.int4 import quantize_int4
from thinkwise.kernels.linear_methods.int8 import quantize_int8
from thinkwise.kernels.triton_gemm import SplitKWorkspace
from thinkwise.kernels.triton_quant_gemm import QuantGemmConfig

SHAPES = {  # model -> {projection: (N, K)}
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                  "lm_head": (128256, 4096)},
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
                   "lm_head": (151936, 1024)},
}
METHODS = ("int8", "int4-g32", "int4-g128")


def wide_configs() -> list[QuantGemmConfig]:
    configs = []
    for block_n, block_k in ((4, 1024), (4, 2048), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256)):
        for warps in (4, 8):
            for pairs, sums in ((False, False), (True, False), (False, True)):
                configs.append(QuantGemmConfig(block_n, block_k, warps, 2, use_dot=False, max_rows=4, x_pairs=pairs,
                                               word_sums=sums))
    # int8, x as 64-bit quads: the other int8 GEMV shapes, short programs (few rows) with long K
    # tiles, and two tiles ahead
    for block_n, block_k, warps, ahead in ((8, 1024, 8, 1), (32, 256, 4, 1), (8, 512, 4, 2), (16, 1024, 8, 1),
                                           (4, 1024, 4, 2), (4, 4096, 4, 1), (4, 4096, 8, 1), (2, 4096, 4, 1),
                                           (4, 2048, 4, 2), (8, 4096, 8, 1), (2, 2048, 4, 1), (4, 2048, 8, 1)):
        configs.append(QuantGemmConfig(block_n, block_k, warps, 2, use_dot=False, max_rows=4, x_quads=True,
                                       prefetch=ahead))
    for block_n, block_k in ((8, 1024), (16, 2048), (32, 512), (64, 512), (64, 1024)):
        for warps in (4, 8):
            configs.append(QuantGemmConfig(block_n, block_k, warps, 2, use_dot=False, max_rows=4, half2=True))
    for block_n, block_k in ((32, 256), (64, 128), (128, 64), (128, 128)):
        for warps, stages in ((4, 3), (8, 3)):
            for split in (1, 2, 4):
                for magic in (False, True):
                    configs.append(QuantGemmConfig(block_n, block_k, warps, stages, max_rows=4096, split_k=split,
                                                   magic_decode=magic))
    # x @ W^T with the dequantized weights as the shared-memory B operand (int4, bf16 pairs)
    for block_n, block_k, warps, stages in ((64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (256, 128, 8, 3),
                                            (128, 128, 4, 4), (128, 256, 8, 3)):
        for split in (1, 2, 4, 8):
            for ahead in (False, True):  # the next weight tile decoded after this one's dot is issued
                configs.append(QuantGemmConfig(block_n, block_k, warps, stages, max_rows=4096, split_k=split,
                                               bf16_pairs=True, weight_b=True, decode_ahead=ahead))
    # K tiles of 64 inside groups of 128 (a third of the 128-wide tiles' shared memory and registers:
    # 3-6 programs an SM); on an H100 at 64 rows each was slower than the 128-wide tiles.
    for block_n, warps, split in ((128, 4, 1), (128, 8, 1), (64, 4, 2), (64, 4, 4)):
        configs.append(QuantGemmConfig(block_n, 64, warps, 3, max_rows=4096, split_k=split, bf16_pairs=True,
                                       weight_b=True))
    return configs


def stored(method: str, weight: torch.Tensor):
    """(q, scales, zeros, group, bytes stored) of one weight under `method`."""
    if method == "int8":
        q, scales = quantize_int8(weight, weight.dtype)
        return q, scales, None, weight.shape[1], q.numel() + scales.numel() * 2
    group = int(method.rpartition("g")[2])
    codes, scales, zeros = quantize_int4(weight, group, weight.dtype)
    q = tq.pack_int4(codes)
    return q, scales, zeros, group, q.numel() + 4 * scales.numel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama3-8b,qwen3-0.6b")
    parser.add_argument("--rows", default="1,64")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sweep", choices=("default", "wide", "weight_b"), default="default",
                        help="the engine's tilings, plus a wide grid (wide) or only its weight_b part (weight_b)")
    parser.add_argument("--projections", default=None,
                        help="comma-separated projections to time (qkv, o, gate_up, down, lm_head); default all")
    add_output_arguments(parser, "gpu_quant_gemm")
    args = parser.parse_args()
    projections = None if args.projections is None else [p.strip() for p in args.projections.split(",")]
    unknown = sorted(set(projections or []) - {p for shapes in SHAPES.values() for p in shapes})
    if unknown:
        parser.error(f"--projections: unknown {', '.join(unknown)}; use qkv, o, gate_up, down, lm_head")
    require_cuda("gpu_quant_gemm.py")
    out = output_path(args, "gpu_quant_gemm")
    device = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    bandwidth = copy_bandwidth()
    # The engine's tilings, the candidates waiting for their first GPU timing, and (wide) a grid.
    grid = [] if args.sweep == "default" else [c for c in wide_configs() if args.sweep == "wide" or c.weight_b]
    configs = list(dict.fromkeys([*tq.DEFAULT_CONFIGS, *tq.WEIGHT_B_CANDIDATES, *grid]))
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for model in args.shapes.split(","):
        for proj, (n, k) in SHAPES[model].items():
            if projections is not None and proj not in projections:
                continue
            torch.manual_seed(0)
            base = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            copies16 = max(1, math.ceil(L2_SWEEP * l2 / (n * k * 2)))
            weights16 = [base] + [base.clone() for _ in range(copies16 - 1)]
            for rows in rows_list:
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
                passes = max(1, min(math.ceil(GRAPH_BYTES / (copies16 * n * k * 2)), MAX_GRAPH_CALLS // copies16))
                bf16_us = cuda_graph_time_us([lambda w=w: F.linear(x, w) for _ in range(passes) for w in weights16])
                moved16 = n * k * 2 + 2 * rows * (n + k)
                line = {"model": model, "proj": proj, "n": n, "k": k, "rows": rows, "bf16_us": round(bf16_us, 2),
                        "bf16_tb_s": round(moved16 / bf16_us / 1e6, 3), "methods": {}}
                print(f"{model:10s} {proj:8s} {n:6d}x{k:<6d} M={rows:<3d} bf16 {bf16_us:8.1f} us "
                      f"{moved16 / bf16_us / 1e6:5.2f} TB/s")
                for method in args.methods.split(","):
                    q, scales, zeros, group, nbytes = stored(method, base)
                    copies = max(1, math.ceil(L2_SWEEP * l2 / nbytes))
                    sets = [(q, scales, zeros)] + [(q.clone(), scales.clone(), None if zeros is None else zeros.clone())
                                                   for _ in range(copies - 1)]
                    want = tq.quant_gemm_reference(x.float(), q, scales.float(), None if zeros is None else zeros.float(),
                                                   None, group)
                    passes_q = max(1, min(math.ceil(GRAPH_BYTES / (copies * nbytes)), MAX_GRAPH_CALLS // copies))
                    # split-K tilings share one workspace, as the engine's layers do (without one each
                    # call would allocate and zero its own: a memset more per call)
                    workspace = None
                    timings = {}
                    for config in configs:
                        if (config.word_sums or config.half2 or config.bf16_pairs) and method == "int8":
                            continue  # an int4-only variant
                        if config.x_quads and method != "int8":
                            continue  # an int8-only variant
                        if rows > config.max_rows or (not config.use_dot and rows > tq.GEMV_MAX_ROWS):
                            continue
                        if config.use_dot and rows <= tq.GEMV_MAX_ROWS and config not in tq.DEFAULT_CONFIGS:
                            continue  # the wide grid's dot tiles are for many rows
                        need = tq.workspace_size(rows, n, k, group, zeros is not None, config)
                        if need[1] and (workspace is None or not workspace.fits(*need)):
                            workspace = SplitKWorkspace(device, max(need[0], workspace.partials.numel() if workspace
                                                                    else 0), max(need[1], 4096))
                        got = tq.triton_quant_gemm(x, q, scales, zeros, None, group, config, workspace=workspace)
                        got = got.float()
                        error = ((got - want).norm() / want.norm()).item()
                        if not error < 2e-2:
                            print(f"    {method} {config.name}: WRONG (relative error {error:.3g})")
                            continue
                        timings[config.name] = cuda_graph_time_us(
                            [lambda s=s, c=config, ws=workspace: tq.triton_quant_gemm(x, *s, None, group, c,
                                                                                      workspace=ws)
                             for _ in range(passes_q) for s in sets])
                    if not timings:
                        continue
                    best = min(timings, key=timings.get)
                    us = timings[best]
                    moved = nbytes + 2 * rows * (n + k)
                    line["methods"][method] = {"best": best, "us": round(us, 2), "tb_s": round(moved / us / 1e6, 3),
                                               "vs_bf16": round(bf16_us / us, 3),
                                               "all_us": {c: round(t, 2) for c, t in sorted(timings.items(),
                                                                                            key=lambda i: i[1])}}
                    print(f"    {method:9s} {us:8.1f} us {moved / us / 1e6:5.2f} TB/s  {bf16_us / us:5.2f}x bf16  "
                          f"({best}; next: {', '.join(list(line['methods'][method]['all_us'])[1:3])})")
                results.append(line)
    write_result(out, {"device": torch.cuda.get_device_name(), "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
                       "sweep": args.sweep, "results": results})


if __name__ == "__main__":
    main()
