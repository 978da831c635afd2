"""int4 / int8 dequantize (prefill's dequantize-then-cuBLAS): its tilings vs the engine's, per shape.

A quantized layer's prefill at a 2048-row rung writes a 16-bit copy of its weight and hands it
to cuBLAS, once per layer and chunk: on an H100 ~0.35 ms a Llama-3-8B layer at int4-g128, the
part of prefill a bf16 model does not pay. For each Llama-3-8B projection this times
`triton_quant_gemm.dequantize` in each tile (rows, K, warps), with int4 scales loaded per code
byte or once per group, with and without the integer rounding before the store (a GPU's own
conversion rounds to nearest even), next to the engine's current choice (DEQUANTIZE_*) and
to the cuBLAS GEMM the copy feeds (2048 rows), all in one run. Every variant must write the
PyTorch twin's values bit for bit, or it is reported as a mismatch and never chosen. Prints
the best variant's per-layer sum against the current one. Writes a new JSON file under $OUT
or benchmarks/results (or --out).

    python benchmarks/gpu_dequantize.py [--method int4-g128|int8] [--tiles 16x256x4,32x512x8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TILES = "16x256x4,8x512x4,32x256x8,16x512x8,32x512x8,64x256x8,16x1024x8,64x128x4"


def parse_tiles(text: str) -> list[tuple[int, int, int]]:
    """'16x256x4,32x512x8' -> [(16, 256, 4), (32, 512, 8)]: tiles `dequantize` takes
    (`check_dequantize_tile`), at most 65536 weights each."""
    from thinkwise.kernels.triton_quant_gemm import check_dequantize_tile

    tiles = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"tile {item!r}: write ROWSxKxWARPS, e.g. 16x256x4")
        rows, k, warps = (int(p) for p in parts)
        try:
            check_dequantize_tile((rows, k, warps))
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if rows * k > 1 << 16:
            raise argparse.ArgumentTypeError(f"tile {item!r}: rows x K must be at most 65536")
        tiles.append((rows, k, warps))
    return tiles


def timed_us(call, reps: int = 30) -> float:
    """GPU microseconds per call, replayed from a CUDA graph as the engine's table times its tilings."""
    from thinkwise.kernels.linear_dispatch import cuda_graph_time_us

    return cuda_graph_time_us([call] * reps)


def variant_name(tile: tuple[int, int, int], loads: bool, hand: bool) -> str:
    return f"{tile[0]}x{tile[1]}x{tile[2]}{'_group_loads' if loads else ''}{'' if hand else '_no_hand_round'}"


def measure_shape(name: str, n: int, k: int, variants: list, group: int, totals: dict, device: str, timer) -> dict:
    """One weight [n, k] (int4 with `group`, or int8 where group is 0): each variant checked
    against the twin bit for bit, then timed by `timer(call)`; adds its time into `totals`
    (inf for a variant that fails or differs, so it is never the best)."""
    import torch

    from thinkwise.kernels import triton_quant_gemm as tq
    from thinkwise.kernels.linear_methods.int4 import quantize_int4
    from thinkwise.kernels.linear_methods.int8 import quantize_int8

    torch.manual_seed(0)
    weight = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
    if group:
        codes, scales, zeros = quantize_int4(weight, group, torch.bfloat16)
        q = tq.pack_int4(codes)
    else:
        (q, scales), zeros = quantize_int8(weight, torch.bfloat16), None
    want = tq.dequantize_reference(q, scales, zeros, group or k).to(torch.bfloat16)
    line = {"shape": name, "n": n, "k": k, "us": {}}
    for tile, loads, hand in variants:
        key = variant_name(tile, loads, hand)

        def call(tile=tile, loads=loads, hand=hand):
            return tq.dequantize(q, scales, zeros, group or k, torch.bfloat16, use_triton=True, tile=tile,
                                 group_loads=loads, hand_round=hand)
        try:
            same = torch.equal(call(), want)
        except Exception as error:  # a tiling that does not compile here: reported, never chosen
            line["us"][key], totals[(tile, loads, hand)] = f"error: {str(error).splitlines()[0][:160]}", float("inf")
            continue
        if not same:
            line["us"][key], totals[(tile, loads, hand)] = "mismatch with the twin", float("inf")
            continue
        line["us"][key] = round(timer(call), 2)
        totals[(tile, loads, hand)] += line["us"][key]
    x = torch.randn(2048, k, device=device, dtype=torch.bfloat16)
    line["cublas_2048_rows_us"] = round(timer(lambda: x @ weight.T), 2) if device == "cuda" else None
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="int4-g128", choices=["int4-g32", "int4-g64", "int4-g128", "int8"])
    parser.add_argument("--tiles", type=parse_tiles, default=parse_tiles(TILES), help=f"default {TILES}")
    add_output_arguments(parser, "gpu_dequantize")
    args = parser.parse_args()
    path = output_path(args, "gpu_dequantize")
    require_cuda("gpu_dequantize.py")
    import torch

    from thinkwise.kernels import triton_quant_gemm as tq

    int4 = args.method.startswith("int4")
    group = int(args.method.split("-g")[1]) if int4 else 0
    current = (tq.DEQUANTIZE_TILE, tq.DEQUANTIZE_GROUP_LOADS and int4, tq.DEQUANTIZE_HAND_ROUND)
    variants = list(dict.fromkeys([current] + [(tile, loads, hand) for tile in args.tiles
                                               for loads in ((False, True) if int4 else (False,))
                                               for hand in (True, False)]))
    totals = {variant: 0.0 for variant in variants}
    rows = []
    for name, (n, k) in SHAPES.items():
        line = measure_shape(name, n, k, variants, group, totals, "cuda", timed_us)
        rows.append(line)
        timings = {key: us for key, us in line["us"].items() if isinstance(us, float)}
        best = min(timings, key=timings.get)
        print(f"{name:8s} {n}x{k}: current {next(iter(line['us'].values()))} us, best {best} {timings[best]} us, "
              f"cuBLAS at 2048 rows {line['cublas_2048_rows_us']} us", flush=True)
    best = min(totals, key=totals.get)
    summary = {"current": {"tile": current[0], "group_loads": current[1], "hand_round": current[2],
                           "layer_us": round(totals[current], 2)},
               "best": {"tile": best[0], "group_loads": best[1], "hand_round": best[2],
                        "layer_us": round(totals[best], 2)},
               "speedup": round(totals[current] / totals[best], 3)}
    print(f"one layer's four dequantizes: current {summary['current']['layer_us']} us, best {best} "
          f"{summary['best']['layer_us']} us ({summary['speedup']}x)")
    write_result(path, {"device": torch.cuda.get_device_name(), "method": args.method, "shapes": rows,
                        "summary": summary})


if __name__ == "__main__":
    main()
