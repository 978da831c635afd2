"""Fit the idealized runtime model runtime = f(prompt) + g x (output - 1) on this machine.

Profiles isolated requests (one at a time, greedy, EOS ignored so each produces exactly
the asked number of tokens; on CUDA after one untimed pass that captures graphs and
compiles kernels) over a grid of prompt and output lengths, fits on a
checkerboard half of the runs and reports the mean absolute percentage error on the
other half. For comparison it also fits runtime = c0 + c1 x effective FLOPs (the
engine's own analytic count, priced with this device's intensity) on the same halves:
how well the cost model's single number predicts time here. Writes a new JSON file
(runtime_model_<model>-<UTC time>.json under $OUT or benchmarks/results, unless --out)
with the command, the machine and the library versions.

    python benchmarks/runtime_model.py --tiny                     # tiny random Llama (seconds)
    python benchmarks/runtime_model.py --model default            # the packaged 0.5B model
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import thinkwise  # noqa: F401  (thread settings before torch)
from benchmarks.common import add_output_arguments, output_path, write_result
from thinkwise import LLM, SamplingParams
from thinkwise.cost import RuntimeModel, device_intensity, effective_flops, profile, split_held_out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --model")
    parser.add_argument("--tiny-config", default="{}",
                        help='JSON overrides of the tiny config, e.g. \'{"hidden_size": 1024, "num_hidden_layers": 8}\'')
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompts", default="16,64,128,256")
    parser.add_argument("--outputs", default="1,8,24,48")
    parser.add_argument("--repeats", type=int, default=1)
    add_output_arguments(parser, "runtime_model_<model>")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.tiny_models import make_tiny_model

        directory = Path(tempfile.mkdtemp()) / "tiny"
        overrides = json.loads(args.tiny_config)
        make_tiny_model("llama", directory, **overrides)
        dtype = "bfloat16" if args.device == "cuda" else "float32"
        name = "tiny-llama"
        if overrides or args.device:
            name += "-" + "-".join([args.device or "cpu"] + [f"{k}{v}" for k, v in overrides.items()])
        out = output_path(args, f"runtime_model_{name}")
        llm = LLM(str(directory), dtype=dtype, device=args.device)
    else:
        name = Path(args.model).name
        out = output_path(args, f"runtime_model_{name}")
        llm = LLM(args.model, device=args.device)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    intensity, intensity_source = device_intensity(engine.device)
    counts = []
    serial = itertools.count()

    def run_one(prompt: int, output: int) -> None:
        offset = next(serial)  # every prompt different: no prefix-cache hits
        ids = [(7 * i + prompt + offset) % vocab for i in range(prompt)]
        out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=output, ignore_eos=True))[0]
        counts.append(out.counts)

    prompts, outputs = [int(p) for p in args.prompts.split(",")], [int(o) for o in args.outputs.split(",")]
    if engine.device.type == "cuda":
        # CUDA graphs are captured per (batch, context-width) bucket and Triton kernels compile on
        # first use: one untimed pass over the grid, or the first run of each size times that.
        profile(run_one, prompts, outputs)
    else:
        run_one(8, 4)
    counts.clear()
    runs = profile(run_one, prompts, outputs, repeats=args.repeats)
    eflops = {id(r): effective_flops(c.flops, c.bytes_weights + c.bytes_kv, intensity) for r, c in zip(runs, counts)}
    fit_runs, held_out = split_held_out(runs)
    model = RuntimeModel.fit(fit_runs)

    # seconds = c0 + c1 x eFLOPs, fitted on the same half
    design = np.array([[1.0, eflops[id(r)]] for r in fit_runs])
    (c0, c1), *_ = np.linalg.lstsq(design, np.array([r.seconds for r in fit_runs]), rcond=None)
    eflops_error = 100 * float(np.mean([abs(c0 + c1 * eflops[id(r)] - r.seconds) / r.seconds for r in held_out]))
    # Mean abs % error weighs a 10 ms run like a 10 s one; the time-weighted error does not.
    weighted = 100 * sum(abs(model.predict(r.prompt_tokens, r.output_tokens) - r.seconds) for r in held_out) / sum(
        r.seconds for r in held_out)

    report = {
        "model": name, "device": str(engine.device), "dtype": str(engine.dtype),
        "fit": model.to_dict(), "fit_runs": len(fit_runs), "held_out_runs": len(held_out),
        "held_out_mean_abs_pct_error": round(model.error_on(held_out), 2),
        "fit_mean_abs_pct_error": round(model.error_on(fit_runs), 2),
        "held_out_time_weighted_abs_pct_error": round(weighted, 2),
        "intensity_flop_per_byte": intensity, "intensity_source": intensity_source,
        "seconds_per_effective_flop": {"intercept_s": float(c0), "s_per_eflop": float(c1),
                                       "held_out_mean_abs_pct_error": round(eflops_error, 2)},
        "totals": {"wall_s": sum(r.seconds for r in runs), "device_time_s": sum(c.device_time_s for c in counts),
                   "energy_j": None if any(c.energy_j is None for c in counts) else sum(c.energy_j for c in counts),
                   "effective_flops": sum(eflops.values())},
        "runs": [dict(vars(r), flops=c.flops, bytes_weights=c.bytes_weights, bytes_kv=c.bytes_kv,
                      effective_flops=eflops[id(r)], device_time_s=c.device_time_s, energy_j=c.energy_j)
                 for r, c in zip(runs, counts)],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    write_result(out, report)


if __name__ == "__main__":
    main()
