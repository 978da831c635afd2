"""`thinkwise bench`: strategies x budgets x tasks, with results, tables and frontier plots.

`run_benchmark` generates the problems (`tasks.generate_problems`), runs every strategy
on them with shared per-problem seeds (`runner.run_bench`, resumable), then writes
`results.jsonl`, `summary.csv`, `report.html` and the accuracy-vs-cost PNGs
(`report.write_report`).
"""

from __future__ import annotations

import time
from pathlib import Path

from thinkwise.bench.report import write_report
from thinkwise.bench.runner import run_bench
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.strategies import parse_strategy
from thinkwise.tasks import generate_problems

__all__ = ["run_benchmark"]


def run_benchmark(llm, tasks: str, strategies: list[str], out_dir: str | Path, *, n_per_level: int = 20,
                  seed: int = 0, params: SamplingParams | None = None, command: str = "", progress=None) -> list[dict]:
    for name in strategies:
        parse_strategy(name)
    problems = generate_problems(tasks, n_per_level, seed)
    params = params or SamplingParams(temperature=0.7, top_p=0.95, max_tokens=512)
    out = Path(out_dir)
    start = time.perf_counter()
    rows = run_bench(llm, problems, strategies, params, out, seed=seed, progress=progress)
    wanted = {p.id for p in problems}
    rows = [r for r in rows if r["problem"] in wanted and r["strategy"] in strategies]
    summary = write_report(rows, out, f"thinkwise bench: {llm.engine.model_name}", command)
    (out / "run.txt").write_text(f"{command}\nseconds: {time.perf_counter() - start:.1f}\n"
                                 f"problems: {len(problems)}, strategies: {len(strategies)}\n")
    return summary
