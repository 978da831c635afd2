"""Flat GEMM for decode: cuBLAS (F.linear) vs the Triton flat-GEMM tilings, per weight shape and M.

For each weight shape [N, K] (Llama-3-8B and Qwen3-0.6B projections and LM heads, bf16)
and M in 1..64 it times one y = x @ W.T of every implementation the way the engine runs
it: calls over enough distinct weight copies (>= 3 L2 sizes) that reads come from HBM,
captured in a CUDA graph and replayed, timed with CUDA events (median of replays).
Achieved bandwidth = bytes the call must move (W once, x, y) / time, next to the
device's copy bandwidth; cuBLAS is timed twice, so the spread between the two is the
noise floor for the ratios. Every Triton result is first checked against cuBLAS. Then it
runs the engine's start-up profile (`GpuLinearDispatcher`) on a full Llama-3-8B set of
weights, twice (cold: Triton compiles; warm: its disk cache), and prints the table.
Prints a side-by-side table; writes a new JSON file under $OUT or benchmarks/results (or --out).

    python benchmarks/gpu_gemm.py [--shapes 4096x4096,...] [--rows 1,2,4] [--sweep default|wide]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result
from benchmarks.gpu_throughput import copy_bandwidth
from thinkwise.kernels import triton_gemm as tg
from thinkwise.kernels.linear_dispatch import GRAPH_BYTES, L2_SWEEP, MAX_GRAPH_CALLS, DispatchLinear, \
    GpuLinearDispatcher, cuda_graph_time_us
from thinkwise.kernels.triton_gemm import FlatGemmConfig

SHAPES = {  # name -> (N, K)
    "8b.qkv": (6144, 4096), "8b.o": (4096, 4096), "8b.gate_up": (28672, 4096), "8b.down": (4096, 14336),
    "8b.lm_head": (128256, 4096),
    "0.6b.qkv": (4096, 1024), "0.6b.o": (1024, 2048), "0.6b.gate_up": (6144, 1024), "0.6b.down": (1024, 3072),
    "0.6b.lm_head": (151936, 1024),
}
ROWS = (1, 2, 4, 8, 16, 32, 64)

# Beyond the start-up candidates: other tile widths, fixed splits, more programs per SM,
# deeper pipelines, 8 warps; to see where the defaults stand.
WIDE_SWEEP = (
    FlatGemmConfig(block_n=32, block_k=256, use_dot=False, max_rows=4),
    FlatGemmConfig(block_n=8, block_k=512, use_dot=False, max_rows=4),
    FlatGemmConfig(block_n=16, block_k=512, use_dot=False, max_rows=4, programs_per_sm=4),
    FlatGemmConfig(block_n=16, block_k=512, use_dot=False, max_rows=4, programs_per_sm=8),
    FlatGemmConfig(block_n=16, block_k=256, num_warps=2, use_dot=False, max_rows=4),
    FlatGemmConfig(block_n=64, block_k=128, num_stages=4, split_k=1),
    FlatGemmConfig(block_n=64, block_k=128, num_stages=4, programs_per_sm=4),
    FlatGemmConfig(block_n=64, block_k=128, num_stages=3),
    FlatGemmConfig(block_n=64, block_k=256, num_stages=3),
    FlatGemmConfig(block_n=32, block_k=128, num_stages=4),
    FlatGemmConfig(block_n=128, block_k=64, num_stages=6),
    FlatGemmConfig(block_n=128, block_k=128, num_warps=8, num_stages=3),
)


def weight_copies(n: int, k: int, l2_bytes: int) -> list[torch.Tensor]:
    per = n * k * 2
    count = max(1, math.ceil(L2_SWEEP * l2_bytes / per))
    return [(torch.randn(n, k, device="cuda") * k**-0.5).bfloat16() for _ in range(count)]


def time_calls(fn, x, weights) -> float:
    per = weights[0].numel() * weights[0].element_size()
    passes = max(1, min(math.ceil(GRAPH_BYTES / (len(weights) * per)), MAX_GRAPH_CALLS // len(weights)))
    return cuda_graph_time_us([lambda w=w: fn(x, w) for _ in range(passes) for w in weights], replays=7)


def bench_shapes(args, configs, bandwidth: float, l2_bytes: int) -> list[dict]:
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name] if name in SHAPES else tuple(int(v) for v in name.split("x"))
        weights = weight_copies(n, k, l2_bytes)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda").bfloat16()
            expected = F.linear(x.float(), weights[0].float())
            moved = n * k * 2 + rows * k * 2 + rows * n * 2
            cublas = time_calls(lambda a, w: F.linear(a, w), x, weights)
            cublas_again = time_calls(lambda a, w: F.linear(a, w), x, weights)
            row = {"shape": name, "N": n, "K": k, "M": rows, "bytes": moved, "timed_copies": len(weights),
                   "cublas_us": round(cublas, 2), "cublas_repeat_us": round(cublas_again, 2),
                   "cublas_GBps": round(moved / cublas / 1e3, 1), "triton": {}}
            for config in configs:
                if rows > config.max_rows:
                    continue
                got = tg.triton_flat_gemm(x, weights[0], None, config).float()
                err = ((got - expected).norm() / expected.norm()).item()
                if not err < 1e-2:
                    raise AssertionError(f"{name} M={rows} {config.name}: relative error {err:.2e}")
                need = tg.workspace_size(rows, n, k, config, x.device)
                workspace = tg.SplitKWorkspace(x.device, *need)
                us = time_calls(lambda a, w, c=config, ws=workspace: tg.triton_flat_gemm(a, w, None, c, ws), x, weights)
                plan = tg.plan_launch(rows, n, k, config, x.device)
                programs = plan.m_tiles * plan.n_tiles * plan.split_k
                row["triton"][config.name] = {"us": round(us, 2), "GBps": round(moved / us / 1e3, 1),
                                              "split_k": plan.split_k, "programs": programs,
                                              "rel_err": float(f"{err:.2e}")}
            if not row["triton"]:  # no config is offered this many rows
                results.append(row)
                continue
            best = min(row["triton"].items(), key=lambda item: item[1]["us"])
            row["best_triton"] = best[0]
            row["best_triton_us"] = best[1]["us"]
            row["cublas_over_triton"] = round(cublas / best[1]["us"], 3)
            row["cublas_vs_copy_bw"] = round(moved / (cublas * 1e-6) / bandwidth, 3)
            row["triton_vs_copy_bw"] = round(moved / (best[1]["us"] * 1e-6) / bandwidth, 3)
            results.append(row)
            print(f"{name:>13} M={rows:<3} cuBLAS {cublas:8.1f} us ({row['cublas_vs_copy_bw']:.0%} of copy bw, "
                  f"repeat {cublas_again:.1f})  best Triton {best[1]['us']:8.1f} us "
                  f"({row['triton_vs_copy_bw']:.0%}) {best[0]}  cuBLAS/Triton {row['cublas_over_triton']:.2f}",
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    return results


def dispatcher_profile(layers: int) -> dict:
    """The engine's start-up profile on a Llama-3-8B set of weights (random bf16)."""
    shapes = [SHAPES[s] for s in ("8b.qkv", "8b.o", "8b.gate_up", "8b.down")]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(DispatchLinear(k, n, bias=False) for _ in range(layers) for n, k in shapes)
            self.lm_head = DispatchLinear(4096, 128256, bias=False)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the 15 GB of weights in bf16 directly
    try:
        with torch.device("cuda"):
            model = Model()
    finally:
        torch.set_default_dtype(previous)
    for module in model.modules():
        if isinstance(module, DispatchLinear):
            module.weight.data.normal_(0, 0.02)
    runs = []
    for attempt in ("first", "second"):
        dispatcher = GpuLinearDispatcher()
        started = time.perf_counter()
        dispatcher.profile(model, torch.bfloat16)
        runs.append({"run": attempt, "seconds": round(time.perf_counter() - started, 2)})
    described = dispatcher.describe()
    described["start_up_runs"] = runs
    del model
    torch.cuda.empty_cache()
    return described


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--sweep", choices=["default", "wide"], default="wide")
    parser.add_argument("--profile-layers", type=int, default=32, help="8B layers for the start-up profile (0: skip)")
    add_output_arguments(parser, "gpu_gemm")
    args = parser.parse_args()
    require_cuda("gpu_gemm.py")
    out = output_path(args, "gpu_gemm")

    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    report = {"device": props.name, "sms": props.multi_processor_count, "l2_bytes": props.L2_cache_size,
              "copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "torch": torch.__version__,
              "triton": __import__("triton").__version__}
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB, "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    if args.profile_layers:
        # First, so its "first" run pays Triton's compiles as a fresh engine start would.
        report["dispatcher"] = dispatcher_profile(args.profile_layers)
        print("start-up profile:", json.dumps(report["dispatcher"]["start_up_runs"]), flush=True)
    configs = list(tg.DEFAULT_CONFIGS) + (list(WIDE_SWEEP) if args.sweep == "wide" else [])
    report["configs"] = [c.name for c in configs]
    report["results"] = bench_shapes(args, configs, bandwidth, props.L2_cache_size)
    write_result(out, report)

    print(f"\n{'shape':>13} {'M':>3} {'cuBLAS us':>9} {'(rep)':>7} {'Triton us':>9} {'cuB/Tri':>7} "
          f"{'cuB bw':>6} {'Tri bw':>6}  best Triton config")
    for r in report["results"]:
        if "best_triton" not in r:
            continue
        print(f"{r['shape']:>13} {r['M']:>3} {r['cublas_us']:>9.1f} {r['cublas_repeat_us']:>7.1f} "
              f"{r['best_triton_us']:>9.1f} {r['cublas_over_triton']:>7.2f} {r['cublas_vs_copy_bw']:>6.0%} "
              f"{r['triton_vs_copy_bw']:>6.0%}  {r['best_triton']}")
    if "dispatcher" in report:
        print("\nstart-up table (8B):")
        for shape, ranges in report["dispatcher"]["implementations"].items():
            print(f"  {shape:>12}: " + ", ".join(f"{a}-{b if b else ''} {impl}" for (a, b), impl in
                                               ((r["rows"], r["impl"]) for r in ranges)))
        print("  start-up seconds:", report["dispatcher"]["start_up_runs"])


if __name__ == "__main__":
    main()
