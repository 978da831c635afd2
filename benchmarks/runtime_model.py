"""Fit the idealized runtime model runtime = f(prompt) + g x (output - 1) on this machine.

Profiles single requests (one at a time, greedy, EOS ignored) over a grid of prompt and
output lengths, fits on every other run and reports the mean absolute percentage error
on the held-out runs. Writes JSON to $OUT (or --out).

    python benchmarks/runtime_model.py --tiny            # tiny random Llama (seconds)
    python benchmarks/runtime_model.py --model default   # the packaged 0.5B model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import thinkwise  # noqa: F401  (thread settings before torch)
from thinkwise import LLM, SamplingParams
from thinkwise.cost import ProfiledRun, RuntimeModel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompts", default="16,64,128,256")
    parser.add_argument("--outputs", default="1,8,24,48")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.tiny_models import make_tiny_model

        directory = Path(tempfile.mkdtemp()) / "tiny"
        make_tiny_model("llama", directory)
        llm, name = LLM(str(directory), dtype="float32"), "tiny-llama"
    else:
        llm, name = LLM(args.model), args.model
    vocab = llm.engine.runner.config.vocab_size
    llm.generate([[1] * 8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
    runs = []
    for prompt in (int(p) for p in args.prompts.split(",")):
        for output in (int(o) for o in args.outputs.split(",")):
            ids = [(7 * i + prompt) % vocab for i in range(prompt)]
            start = time.perf_counter()
            llm.generate([ids], SamplingParams(temperature=0, max_tokens=output, ignore_eos=True))
            runs.append(ProfiledRun(prompt, output, time.perf_counter() - start))
    fit_runs, held_out = runs[0::2], runs[1::2]
    model = RuntimeModel.fit(fit_runs)
    report = {"model": name, "machine": {"processor": platform.processor(), "threads": os.cpu_count()},
              "fit": {"intercept_s": model.intercept_s, "per_prompt_token_s": model.per_prompt_token_s,
                      "per_output_token_s": model.per_output_token_s},
              "held_out_mean_abs_pct_error": round(model.error_on(held_out), 2),
              "fit_mean_abs_pct_error": round(model.error_on(fit_runs), 2),
              "runs": [r.__dict__ for r in runs]}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    out = Path(args.out or os.path.join(os.environ.get("OUT", "benchmarks/results"), f"runtime_model_{name}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
