"""The decode-attention kernel's tuning knobs, swept on one shape, beside the defaults.

`thinkwise.kernels.triton_decode_attention` keeps its tile sizes and schedules as module
constants (FP8_TILE, FP8_WARPS, FP8_STAGES, SPLIT_WAVES, PREFETCH_16BIT) chosen from
measurements on one H100. This benchmark is how those choices are remade on another GPU or
shape: it builds one paged KV cache (shuffled blocks, as a running engine has), a bf16 copy
and its fp8 (e4m3, head-major scales) copy, times the bf16 kernel in both pipelinings and
both softmaxes, then every fp8 knob combination of the grid, each checked against the bf16
kernel's output before it is timed (CUDA-graph replay, as in the engine). It prints each row,
then the best fp8 setting against the defaults and fp8 / best-bf16, and writes a JSON file
under $OUT or benchmarks/results (or --out). The module constants are restored on exit.

    python benchmarks/gpu_attention_knobs.py [--batch 64] [--context 8192] [--heads 32,16] [--kv-heads 8]
        [--tiles 32,64] [--warps 1,2,4] [--stages default,2,4] [--waves 4,8] [--seconds 300]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result

KNOBS = ("FP8_TILE", "FP8_WARPS", "FP8_STAGES", "SPLIT_WAVES", "PREFETCH_16BIT")
HEAD_DIM, BLOCK = 128, 16


def int_list(text: str) -> list[int]:
    """An argparse type: `32,64` -> [32, 64]; anything else is a usage error naming the value."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 or v > 1024 for v in values):
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a comma-separated list of integers in 1..1024")
    return values


def positive(text: str) -> int:
    """An argparse type: one integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text[:60]!r} is not a positive integer")
    return value


def stage_list(text: str) -> list[int | None]:
    """An argparse type like `int_list`, where `default` is Triton's own stage count (the module's None)."""
    return [None if x == "default" else int_list(x)[0] for x in text.split(",")]


def fp8_grid(tiles, warps, stages, waves, defaults: dict | None = None) -> list[dict]:
    """Every fp8 knob combination; the module's defaults first (if in the grid), so that a sweep
    cut short by --seconds still has the row every other row is compared with."""
    grid = [{"FP8_TILE": t, "FP8_WARPS": w, "FP8_STAGES": s, "SPLIT_WAVES": v}
            for t, w, s, v in itertools.product(tiles, warps, stages, waves)]
    if defaults:
        grid.sort(key=lambda knobs: knobs != {k: defaults[k] for k in knobs})
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive, default=64)
    parser.add_argument("--context", type=positive, default=8192, help="tokens per sequence, a multiple of 16")
    parser.add_argument("--heads", type=int_list, default="32,16",
                        help="query-head counts to sweep (Llama-3-8B 32, Qwen3-0.6B 16)")
    parser.add_argument("--kv-heads", type=positive, default=8)
    parser.add_argument("--tiles", type=int_list, default="32,64")
    parser.add_argument("--warps", type=int_list, default="1,2,4")
    parser.add_argument("--stages", type=stage_list, default="default,2,4")
    parser.add_argument("--waves", type=int_list, default="4,8")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="stop sweeping after this long (the rows done so far are kept)")
    add_output_arguments(parser, "gpu_attention_knobs")
    args = parser.parse_args()
    if args.context % BLOCK or any(h % args.kv_heads for h in args.heads):
        parser.error(f"--context must be a multiple of {BLOCK} and every --heads a multiple of --kv-heads")
    require_cuda("gpu_attention_knobs.py")
    out = output_path(args, "gpu_attention_knobs")

    import torch

    import thinkwise.kernels.triton_decode_attention as tda

    defaults = {name: getattr(tda, name) for name in KNOBS}
    grid = fp8_grid(args.tiles, args.warps, args.stages, args.waves, defaults)
    deadline = time.monotonic() + args.seconds
    report = {"device": torch.cuda.get_device_name(), "batch": args.batch, "context": args.context,
              "kv_heads": args.kv_heads, "head_dim": HEAD_DIM, "defaults": defaults, "shapes": []}
    try:
        for heads in args.heads:
            shape = sweep_heads(tda, args, heads, grid, defaults, deadline)
            summarize(shape, defaults)
            report["shapes"].append(shape)
            torch.cuda.empty_cache()
    finally:
        for name, value in defaults.items():
            setattr(tda, name, value)
    write_result(out, report)


def sweep_heads(tda, args: argparse.Namespace, heads: int, grid: list[dict], defaults: dict, deadline: float) -> dict:
    """The bf16 rows and the fp8 grid for one query-head count; the module's knobs are left set."""
    import torch

    from benchmarks.gpu_attention import fp8_copy, paged_cache, timed

    torch.manual_seed(0)
    k_cache, v_cache, tables, lens = paged_cache(args.batch, args.context, args.kv_heads)
    query = torch.randn(args.batch, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    fp8_k, fp8_v = fp8_copy(k_cache, v_cache)
    scale = HEAD_DIM**-0.5

    def attend(keys, values, unified=None):
        return tda.triton_decode_attention(query, keys, values, tables, lens, args.context, scale,
                                           unified_max=unified)

    for name, value in defaults.items():
        setattr(tda, name, value)
    reference = attend(k_cache, v_cache).float()
    shape = {"heads": heads, "bf16": [], "fp8": []}
    for prefetch, unified in itertools.product((True, False), (None, 0.0)):
        tda.PREFETCH_16BIT = prefetch
        row = {"PREFETCH_16BIT": prefetch, "unified_max": unified is not None,
               "us": round(timed(lambda: attend(k_cache, v_cache, unified)) * 1e6, 1)}
        shape["bf16"].append(row)
        print(json.dumps({"heads": heads, "cache": "bf16", **row}), flush=True)
    tda.PREFETCH_16BIT = defaults["PREFETCH_16BIT"]
    for knobs in grid:
        if time.monotonic() > deadline:
            shape["cut_short"] = True
            break
        for name, value in knobs.items():
            setattr(tda, name, value)
        row = dict(knobs)
        try:
            output = attend(fp8_k, fp8_v).float()
            row["error_vs_bf16"] = round(((output - reference).norm() / reference.norm()).item(), 4)
            row["us"] = round(timed(lambda: attend(fp8_k, fp8_v)) * 1e6, 1)
        except Exception as error:  # noqa: BLE001 - a setting Triton cannot compile is a result, not a crash
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        if tda._fp16_path_failure is not None:  # this setting broke the fp16 path: say so, re-arm it
            row["fp16_path_failed"] = tda._fp16_path_failure
            tda._fp16_path_failure = None
        shape["fp8"].append(row)
        print(json.dumps({"heads": heads, "cache": "fp8", **row}), flush=True)
    return shape


def summarize(shape: dict, defaults: dict) -> None:
    """Adds and prints the best fp8 row, the default fp8 row and fp8 / bf16 ratios."""
    timed_rows = [row for row in shape["fp8"] if "us" in row and row.get("error_vs_bf16", 1) < 0.05]
    if not timed_rows or not shape["bf16"]:
        return
    best = min(timed_rows, key=lambda row: row["us"])
    default = next((row for row in timed_rows if all(row[k] == defaults[k] for k in row if k in defaults)), None)
    bf16_best = min(row["us"] for row in shape["bf16"])

    def bf16_at_default_prefetch(unified_max: bool) -> float:
        return next(row["us"] for row in shape["bf16"]
                    if row["PREFETCH_16BIT"] == defaults["PREFETCH_16BIT"] and row["unified_max"] == unified_max)

    # bf16's default is the unified max (EngineConfig.unified_max_softmax); the fp8 path always
    # takes the synchronized softmax, so both bf16 rows are kept.
    bf16_default, bf16_synchronized = bf16_at_default_prefetch(True), bf16_at_default_prefetch(False)
    shape["summary"] = {
        "best_fp8": best, "default_fp8": default, "bf16_best_us": bf16_best, "bf16_default_us": bf16_default,
        "bf16_synchronized_us": bf16_synchronized,
        "best_fp8_vs_best_bf16": round(bf16_best / best["us"], 3),
        "default_fp8_vs_default_bf16": round(bf16_default / default["us"], 3) if default else None,
        "default_fp8_vs_synchronized_bf16": round(bf16_synchronized / default["us"], 3) if default else None,
    }
    print(json.dumps({"heads": shape["heads"], "summary": shape["summary"]}), flush=True)


if __name__ == "__main__":
    main()
