"""`thinkwise bench`: strategies x budgets x tasks, with results, tables and frontier plots.

`plan_benchmark` generates the distinct problems (`tasks.generate_problems`, in the chosen
prompt style) and lists the runs still to do (`runner.plan_runs`: resumable), with an
upper bound on their decode tokens, before any model is loaded; `run_benchmark` runs
every strategy on them with shared per-problem seeds, each strategy from an empty prefix
cache (`runner.run_bench`), then writes `results.jsonl`, `summary.csv`, `paired_tests.csv`,
a self-contained `report.html` and the accuracy-vs-cost PNGs (`report.write_report`).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

from thinkwise.bench.report import write_report
from thinkwise.bench.runner import Plan, check_config, plan_runs, run_bench
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.errors import InvalidParameterError
from thinkwise.strategies import parse_strategy
from thinkwise.tasks import Problem, generate_problems
from thinkwise.tasks.base import check_prompt_style, shortfall

__all__ = ["BenchPlan", "plan_benchmark", "run_benchmark", "model_title"]

DEFAULT_PARAMS = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=512)


@dataclass
class BenchPlan:
    problems: list[Problem]
    plan: Plan
    shortfall: dict[tuple[str, int], int]  # (family, level) -> distinct problems, where fewer than asked

    def estimate(self, seeds: int) -> str:
        """What the run will do, in words: printed before a long run starts."""
        lines = [f"estimate: {self.plan.runs} runs to do ({len(self.problems)} problems x strategies"
                 f"{f' x {seeds} seeds (greedy once)' if seeds > 1 else ''}), {self.plan.samples} samples, "
                 f"at most {self.plan.token_bound:,} decode tokens"]
        for (family, level), count in sorted(self.shortfall.items()):
            lines.append(f"note: {family} level {level} has only {count} distinct problem"
                         f"{'s' if count != 1 else ''}; running those, not repeats")
        return "\n".join(lines)


def plan_benchmark(tasks: str, strategies: list[str], out_dir: str | Path, *, n_per_level: int = 20, seed: int = 0,
                   params: SamplingParams | None = None, seeds: int = 1, prompt_style: str = "cot",
                   max_tokens: int | None = None) -> BenchPlan:
    """The problems and the runs still to do; needs no model (so `--dry-run` is instant)."""
    for name in strategies:
        parse_strategy(name)
    if not strategies:
        raise InvalidParameterError("no strategies given; e.g. --strategies greedy,majority@4", param="strategies")
    if seeds < 1:
        raise InvalidParameterError(f"--seeds must be >= 1, got {seeds}", param="seeds")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidParameterError(f"--max-tokens must be >= 1, got {max_tokens}", param="max_tokens")
    check_prompt_style(prompt_style)
    problems = generate_problems(tasks, n_per_level, seed, prompt_style)
    plan = plan_runs(problems, strategies, params or DEFAULT_PARAMS, Path(out_dir), seeds, max_tokens)
    return BenchPlan(problems, plan, shortfall(problems, n_per_level))


def model_title(llm) -> str:
    """The model's real name (the alias `default` resolved) for the report's title."""
    name = llm.engine.model_name
    if name == "default":
        from thinkwise.loading.default_model import DEFAULT_MODEL_NAME

        return f"{DEFAULT_MODEL_NAME} (thinkwise default model, GGUF)"
    return name


def engine_settings(llm, params: SamplingParams, prompt_style: str, seeds: int, max_tokens: int | None) -> dict:
    import torch

    engine = llm.engine
    config = engine.config
    return {
        "model": model_title(llm), "device": str(engine.device), "dtype": str(engine.dtype).replace("torch.", ""),
        "kv blocks": f"{engine.block_manager.num_blocks} x {config.block_size} tokens",
        "max sequences per batch": config.max_num_seqs, "max batched tokens": config.max_num_batched_tokens,
        "prefix caching": "on, emptied before every strategy's batch" if config.enable_prefix_caching else "off",
        "temperature": params.temperature, "top-p": params.top_p,
        "max tokens per sample": max_tokens if max_tokens is not None else "per family and level (column max_tokens)",
        "prompt style": prompt_style, "sampling seeds": seeds,
        "torch": torch.__version__, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}"
                                               f", {__import__('os').cpu_count()} cores",
    }


def run_benchmark(llm, tasks: str, strategies: list[str], out_dir: str | Path, *, n_per_level: int = 20,
                  seed: int = 0, params: SamplingParams | None = None, command: str = "", progress=None,
                  seeds: int = 1, prompt_style: str = "cot", max_tokens: int | None = None,
                  planned: BenchPlan | None = None) -> list[dict]:
    params = params or DEFAULT_PARAMS
    out = Path(out_dir)
    planned = planned or plan_benchmark(tasks, strategies, out, n_per_level=n_per_level, seed=seed, params=params,
                                        seeds=seeds, prompt_style=prompt_style, max_tokens=max_tokens)
    check_config(out, {"tasks": tasks, "seed": seed, "prompt_style": prompt_style, "temperature": params.temperature,
                       "top_p": params.top_p, "max_tokens": max_tokens, "model": llm.engine.model_name})
    start = time.perf_counter()
    rows = run_bench(llm, planned.problems, strategies, params, out, seed=seed, progress=progress, seeds=seeds,
                     max_tokens=max_tokens)
    wanted = {p.id for p in planned.problems}
    rows = [r for r in rows if r["problem"] in wanted and r["strategy"] in strategies and r["replicate"] < seeds]
    settings = engine_settings(llm, params, prompt_style, seeds, max_tokens)
    summary = write_report(rows, out, f"thinkwise bench: {model_title(llm)}", command, settings=settings,
                           strategies=strategies, shortfall=planned.shortfall, n_per_level=n_per_level)
    (out / "run.txt").write_text(f"{command}\nseconds: {time.perf_counter() - start:.1f}\n"
                                 f"problems: {len(planned.problems)}, strategies: {len(strategies)}, seeds: {seeds}\n")
    return summary
