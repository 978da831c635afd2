"""Run every strategy on the same problems and record answers, correctness and cost.

Each problem gets one sampling seed derived from the run's seed and the problem id,
shared by every strategy, so strategies are compared on the same draws (majority@8 and
short-3@8 see the same 8 samples until short-m@k stops them). All problems of one
strategy run concurrently through one `AsyncEngine` (they batch together); results are
appended to `results.jsonl` as they complete, and a rerun skips the (problem, strategy)
pairs already there, so an interrupted CPU run resumes. Accuracy reruns exactly because
seeded sampling depends only on (seed, position) and the batch composition of a rerun is
the same.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.errors import InvalidParameterError
from thinkwise.strategies import parse_strategy
from thinkwise.tasks import Problem, get_family


def problem_seed(run_seed: int, problem: Problem) -> int:
    digest = hashlib.sha256(f"{run_seed}:{problem.id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _timed_check(family, problem: Problem, text: str) -> tuple[bool, float]:
    start = time.perf_counter()
    correct = family.check(problem, text)
    return correct, time.perf_counter() - start


def run_bench(llm, problems: list[Problem], strategies: list[str], params: SamplingParams, out_dir: Path,
              seed: int = 0, progress=None) -> list[dict]:
    """Run, append to out_dir/results.jsonl, and return every row (old and new)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()] \
        if results_path.exists() else []
    done = {(r["problem"], r["strategy"]) for r in rows}
    specs = {}
    for name in strategies:
        specs[name] = parse_strategy(name)  # fail early on a bad name
    from thinkwise.llm import StrategyJob

    for name in strategies:
        todo = [p for p in problems if (p.id, name) not in done]
        if not todo:
            continue
        jobs = []
        for problem in todo:
            family = get_family(problem.family)
            jobs.append(StrategyJob(
                problem.prompt, specs[name], replace(params, seed=problem_seed(seed, problem)),
                extract=lambda text, f=family, p=problem: f.extract(p, text),
            ))
        try:
            answers = llm.run_strategy_jobs(jobs)
        except InvalidParameterError as error:
            raise InvalidParameterError(f"strategy {name}: {error}", param="strategies") from None
        with results_path.open("a") as sink:
            for problem, answer in zip(todo, answers):
                row = result_row(problem, name, answer)
                rows.append(row)
                sink.write(json.dumps(row) + "\n")
        if progress is not None:
            progress(name, len(todo))
    return rows


def result_row(problem: Problem, strategy: str, answer) -> dict:
    """One results.jsonl line. Each sample is checked once (for code tasks a sandbox run); the
    chosen answer's correctness is its sample's. ENAMEL-style efficiency of a code sample is 0
    when wrong, else min(1, t_ref / t_sample), both timed through the same sandbox check (so
    interpreter start-up dominates small functions; the ratio is still an honest measurement)."""
    family = get_family(problem.family)
    reference_seconds = None
    samples, correct_by_text = [], {}
    for sample in answer.samples:
        correct, seconds = _timed_check(family, problem, sample.text)
        correct_by_text[sample.text] = correct
        efficiency = None
        if problem.family == "code":
            if correct and reference_seconds is None:
                reference_seconds = _timed_check(family, problem, family.reference_response(problem))[1]
            efficiency = min(1.0, reference_seconds / seconds) if correct and seconds > 0 else float(correct)
        samples.append({"answer": sample.answer, "tokens": sample.num_tokens, "finish": sample.finish_reason,
                        "correct": correct, "efficiency": efficiency})
    chosen_correct = bool(answer.text) and correct_by_text.get(answer.text, None)
    if chosen_correct is None:
        chosen_correct = family.check(problem, answer.text)
    cost = answer.cost
    return {
        "problem": problem.id, "family": problem.family, "level": problem.level, "strategy": strategy,
        "answer": answer.answer, "reference": problem.reference, "correct": chosen_correct,
        "votes": answer.votes, "samples": samples,
        "cost": {"decode_tokens": cost.decode_tokens, "aborted_tokens": cost.aborted_tokens,
                 "prompt_tokens_computed": cost.prompt_tokens_computed,
                 "prompt_tokens_cached": cost.prompt_tokens_cached, "forced_tokens": cost.forced_tokens,
                 "flops": cost.flops, "bytes_moved": cost.bytes_moved, "effective_flops": cost.effective_flops,
                 "seconds": cost.wall_time_s, "device_seconds": cost.device_time_s, "energy_j": cost.energy_j},
    }
