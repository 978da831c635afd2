"""Run every strategy on the same problems and record answers, correctness and cost.

Each problem gets one sampling seed per replicate, derived from the run's seed, the
replicate and the problem id, shared by every strategy, so strategies are compared on the
same draws (majority@8 and short-3@8 see the same 8 samples until short-m@k stops them);
`--seeds S` repeats the sampled strategies with S seeds (greedy is deterministic and runs
once). All problems of one (strategy, replicate) run concurrently through one
`AsyncEngine`. Before each such batch the prefix cache is emptied, so a strategy never
finds prompts another strategy (or replicate) computed. Within a batch, problems can still
find each other's leading prompt blocks (the chat template's system prefix), depending on
which the engine admitted first; those tokens are charged back at computed cost
(`Charge`: FLOPs and the bytes of computing them), so each row's `flops_alone` and
`effective_flops_alone` are what the problem costs run alone, whatever the order; the
cache saving stays visible as `prompt_tokens_shared`. (Bytes of weights read are split
over whatever shares an engine step, as in any batched serving, so effective FLOPs still
move a little with the batch's timing; tokens and FLOPs do not.) Rows are appended to
`results.jsonl` as problems finish, and a
rerun skips the (problem, strategy, replicate) rows already there, so an interrupted CPU
run resumes; `bench_config.json` records the settings that decide a row, and a rerun with
different ones is refused instead of mixing them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.errors import InvalidParameterError
from thinkwise.strategies import parse_strategy
from thinkwise.tasks import Problem, get_family

# Strategies whose answer does not depend on the sampling seed: one replicate is enough.
DETERMINISTIC = ("greedy",)


@dataclass(frozen=True)
class Charge:
    """How to price prompt tokens a problem found cached by another problem of its batch."""

    cost_spec: object  # thinkwise.cost.model_cost.ModelCostSpec
    intensity: float  # FLOP per byte of the device (Kinetics)
    block_size: int

    @classmethod
    def of(cls, llm) -> "Charge | None":
        engine = getattr(llm, "engine", None)
        if engine is None or not hasattr(engine, "cost_spec"):
            return None
        from thinkwise.cost.hardware import device_intensity

        return cls(engine.cost_spec, device_intensity(engine.device)[0], engine.config.block_size)

    def shared_tokens(self, cost) -> int:
        """Cached prompt tokens beyond those the strategy's own later requests (adaptive's
        rounds) would find cached when run alone: each request after the first reuses the
        prompt's full blocks, all but the last token."""
        if cost.requests < 1:
            return 0
        prompt = cost.prompt_tokens // cost.requests
        own = (cost.requests - 1) * ((prompt - 1) // self.block_size * self.block_size)
        return max(0, cost.prompt_tokens_cached - own)

    def alone(self, cost) -> tuple[int, float, float]:
        """(shared tokens, FLOPs alone, effective FLOPs alone)."""
        shared = self.shared_tokens(cost)
        spec = self.cost_spec
        flops = spec.dense_flops(shared) + spec.attention_flops(0, shared)
        moved = shared * (spec.kv_bytes_per_token + spec.embedding_row_bytes)  # KV written, embedding rows read
        return shared, cost.flops + flops, cost.effective_flops + flops + self.intensity * moved


def problem_seed(run_seed: int, problem: Problem, replicate: int = 0) -> int:
    key = f"{run_seed}:{problem.id}" if replicate == 0 else f"{run_seed}:{replicate}:{problem.id}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little")


def samples_per_run(strategy: str) -> int:
    """The most samples one run of the strategy draws (its k; 1 for greedy and budget)."""
    spec = parse_strategy(strategy)
    return 1 if spec.kind == "greedy" else max(spec.k, 1)


def replicates_of(strategy: str, seeds: int) -> range:
    spec = parse_strategy(strategy)
    return range(1) if spec.kind in DETERMINISTIC or spec.definition.deterministic else range(seeds)


def problem_max_tokens(problem: Problem, params: SamplingParams, override: int | None) -> int:
    """`override` (the user's --max-tokens) or the family's default for the level and style;
    JSONL rows use `params.max_tokens`."""
    if override is not None:
        return override
    if problem.family == "jsonl":
        return params.max_tokens
    return get_family(problem.family).max_tokens(problem.level, problem.style)


@dataclass
class Plan:
    """The runs a bench will do: (strategy, replicate, problems still to run)."""

    batches: list[tuple[str, int, list[Problem]]]
    max_tokens: dict[str, int]  # problem id -> decode limit per sample

    @property
    def runs(self) -> int:
        return sum(len(problems) for _, _, problems in self.batches)

    @property
    def samples(self) -> int:
        return sum(samples_per_run(name) * len(problems) for name, _, problems in self.batches)

    @property
    def token_bound(self) -> int:
        """At most this many decode tokens (every sample running to its limit)."""
        return sum(samples_per_run(name) * self.max_tokens[p.id] for name, _, problems in self.batches
                   for p in problems)


def read_rows(out_dir: Path) -> list[dict]:
    path = out_dir / "results.jsonl"
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise InvalidParameterError(f"{path}:{number} is not a JSON line (a run killed mid-write?); delete that "
                                        "line to resume", param="out") from None
    for row in rows:
        row.setdefault("replicate", 0)
    return rows


def plan_runs(problems: list[Problem], strategies: list[str], params: SamplingParams, out_dir: Path, seeds: int,
              max_tokens: int | None) -> Plan:
    done = {(r["problem"], r["strategy"], r["replicate"]) for r in read_rows(out_dir)}
    batches = []
    for replicate in range(seeds):
        for name in strategies:
            if replicate not in replicates_of(name, seeds):
                continue
            todo = [p for p in problems if (p.id, name, replicate) not in done]
            if todo:
                batches.append((name, replicate, todo))
    return Plan(batches, {p.id: problem_max_tokens(p, params, max_tokens) for p in problems})


def check_config(out_dir: Path, config: dict) -> None:
    """Refuse to add rows made with other settings to an existing results file."""
    path = out_dir / "bench_config.json"
    if path.exists() and (out_dir / "results.jsonl").exists():
        old = json.loads(path.read_text())
        changed = [key for key in config if key in old and old[key] != config[key]]
        if changed:
            details = ", ".join(f"{key} {old[key]!r} -> {config[key]!r}" for key in changed)
            raise InvalidParameterError(f"{out_dir} holds results made with other settings ({details}); use a new "
                                        "--out directory, or the same settings to resume", param="out")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def run_bench(llm, problems: list[Problem], strategies: list[str], params: SamplingParams, out_dir: Path,
              seed: int = 0, progress=None, seeds: int = 1, max_tokens: int | None = None) -> list[dict]:
    """Run, append to out_dir/results.jsonl, and return every row (old and new).
    `progress(strategy, replicate)` is called once per finished problem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = {name: parse_strategy(name) for name in strategies}  # fail early on a bad name
    plan = plan_runs(problems, strategies, params, out_dir, seeds, max_tokens)
    results_path = out_dir / "results.jsonl"
    charge = Charge.of(llm)
    for name, replicate, todo in plan.batches:
        _empty_prefix_cache(llm)
        jobs = [(problem, replace(params, seed=problem_seed(seed, problem, replicate),
                                  max_tokens=plan.max_tokens[problem.id])) for problem in todo]

        def finished(index: int, answer, name=name, replicate=replicate) -> None:
            problem, job_params = jobs[index]
            row = result_row(problem, name, answer, replicate=replicate, max_tokens=job_params.max_tokens,
                             charge=charge)
            with results_path.open("a") as sink:
                sink.write(json.dumps(row) + "\n")
            if progress is not None:
                progress(name, replicate)

        try:
            run_concurrently(llm, specs[name], jobs, finished)
        except InvalidParameterError as error:
            raise InvalidParameterError(f"strategy {name}: {error}", param="strategies") from None
    return read_rows(out_dir)


def _empty_prefix_cache(llm) -> None:
    block_manager = getattr(getattr(llm, "engine", None), "block_manager", None)
    if block_manager is not None:
        block_manager.reset_prefix_cache()


def run_concurrently(llm, spec, jobs: list[tuple[Problem, SamplingParams]], finished) -> list:
    """One strategy on many problems at once, every sample sharing the engine's batches;
    `finished(index, answer)` runs as each problem completes (progress, saving rows)."""
    from thinkwise.llm import StrategyJob

    verify = spec.definition.needs_verifier  # best-of-k, first-pass@k: the family's own checker
    return llm.run_strategy_jobs([StrategyJob(problem.prompt, spec, params, extract=_family_extractor(problem),
                                              verifier=FamilyChecker(problem) if verify else None)
                                  for problem, params in jobs], on_finished=finished)


class FamilyChecker:
    """A problem's exact checker as a strategy verifier (score 1.0 when its check passes):
    what best-of-k and first-pass@k are given in the bench, an oracle verifier."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.family = get_family(problem.family)

    def score(self, prompt: str, completion: str, answer: str | None = None) -> float:
        return 1.0 if self.family.check(self.problem, completion) else 0.0


def _family_extractor(problem: Problem):
    """The problem's family reads the answer out of a reply (one closure per problem)."""
    family = get_family(problem.family)
    return lambda reply: family.extract(problem, reply)


def _timed_check(family, problem: Problem, text: str) -> tuple[bool, float]:
    start = time.perf_counter()
    correct = family.check(problem, text)
    return correct, time.perf_counter() - start


def result_row(problem: Problem, strategy: str, answer, replicate: int = 0, max_tokens: int | None = None,
               charge: Charge | None = None) -> dict:
    """One results.jsonl line. Each sample is checked once (for code tasks a sandbox run); the
    chosen answer's correctness is its sample's. A sample that ran into the token limit is
    marked `truncated` (finish "length"). ENAMEL-style efficiency of a code sample is 0 when
    wrong, else min(1, t_ref / t_sample), both timed through the same sandbox check (so
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
        samples.append({"text": sample.text, "answer": sample.answer, "tokens": sample.num_tokens,
                        "finish": sample.finish_reason,
                        "truncated": sample.finish_reason == "length", "correct": correct,
                        "efficiency": efficiency})
    chosen_correct = bool(answer.text) and correct_by_text.get(answer.text, None)
    if chosen_correct is None:
        chosen_correct = family.check(problem, answer.text)
    cost = answer.cost
    shared, flops_alone, effective_alone = charge.alone(cost) if charge else (0, cost.flops, cost.effective_flops)
    return {
        "problem": problem.id, "family": problem.family, "level": problem.level, "strategy": strategy,
        "replicate": replicate, "prompt_style": problem.style, "max_tokens": max_tokens,
        "answer": answer.answer, "reference": problem.reference, "correct": chosen_correct,
        "votes": answer.votes, "samples": samples,
        "cost": {"decode_tokens": cost.decode_tokens, "aborted_tokens": cost.aborted_tokens,
                 "prompt_tokens_computed": cost.prompt_tokens_computed,
                 "prompt_tokens_cached": cost.prompt_tokens_cached, "forced_tokens": cost.forced_tokens,
                 "probes": cost.probes, "probe_tokens": cost.probe_tokens, "flops": cost.flops, "bytes_moved": cost.bytes_moved, "effective_flops": cost.effective_flops,
                 "seconds": cost.wall_time_s, "device_seconds": cost.device_time_s, "energy_j": cost.energy_j,
                 "prompt_tokens_shared": shared, "flops_alone": flops_alone, "effective_flops_alone": effective_alone},
    }
