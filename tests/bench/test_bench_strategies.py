"""The bench runs the confidence, probe and verified strategies: names with options, and
first-pass@k given the family's own checker as its verifier."""

from __future__ import annotations

import json

from thinkwise import LLM, SamplingParams
from thinkwise.bench import run_benchmark
from thinkwise.bench.runner import FamilyChecker
from thinkwise.tasks import generate_problems, get_family


def problem_family_reply(problem) -> str:
    return get_family(problem.family).reference_response(problem)

NEW = ["deepconf@3(window=4, eta=50)", "deepconf-online@3(warmup=1, window=4)",
       "probe-majority@2(probe_every=4, probe_agree=2, probe_tokens=3)", "first-pass@3"]


def test_new_strategies_run_in_the_bench(tiny_llama, tmp_path):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512)
    run_benchmark(llm, "sum:1", NEW, tmp_path, n_per_level=1, seed=3, params=SamplingParams(temperature=0.8),
                  max_tokens=12)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["strategy"] for r in rows) == sorted(NEW)
    probe = next(r for r in rows if r["strategy"].startswith("probe"))
    assert probe["cost"]["probes"] >= 0 and "probe_tokens" in probe["cost"]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_family_checker_scores_with_the_family_check():
    problem = generate_problems("sum:1", n_per_level=1, seed=0)[0]
    checker = FamilyChecker(problem)
    assert checker.score("", problem_family_reply(problem)) == 1.0
    assert checker.score("", "no idea") == 0.0
