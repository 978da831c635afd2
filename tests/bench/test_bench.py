"""The bench end to end on a tiny model, its metrics by hand, reproducibility and resume."""

from __future__ import annotations

import csv
import json

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.bench import run_benchmark
from thinkwise.bench.metrics import auc_oaa, e3, eff_at_k, pareto_frontier, pass_at_k

STRATEGIES = ["greedy", "majority@3", "short-1@3"]
TASKS = "sum:1-2,sort:2"


def test_metrics_by_hand():
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert e3(0.5, 100) == 0.0025
    assert auc_oaa([True, True, False], [200, 1200, 10]) == pytest.approx((0.8 + 0 + 0) / 3)
    # eff@k: sorted e = [0, 0.5, 1]; k=2: (C(1,1)*0.5 + C(2,1)*1) / C(3,2) = 2.5/3
    assert eff_at_k([1.0, 0.0, 0.5], 2) == pytest.approx(2.5 / 3)
    assert eff_at_k([0.2, 0.4], 1) == pytest.approx(0.3)
    # (cost, accuracy): point 2 is dominated by point 0.
    assert pareto_frontier([(1, 0.5), (3, 0.9), (2, 0.4), (5, 0.9)]) == [0, 1]


def run(llm, out, n=2):
    return run_benchmark(llm, TASKS, STRATEGIES, out, n_per_level=n, seed=3,
                         params=SamplingParams(temperature=0.8, max_tokens=12))


def test_end_to_end_reproducible_and_resumable(tiny_llama, tmp_path):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512)
    first = run(llm, tmp_path / "a")
    for name in ("results.jsonl", "summary.csv", "report.html", "accuracy_vs_decode_tokens.png",
                 "accuracy_vs_effective_flops.png", "accuracy_vs_seconds.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2 * len(STRATEGIES)  # (sum levels 1, 2 + sort 2) x 2 problems x strategies
    assert {r["strategy"] for r in rows} == set(STRATEGIES)
    majority = [r for r in rows if r["strategy"] == "majority@3"]
    assert all(len(r["samples"]) == 3 and r["cost"]["decode_tokens"] > 0 and r["cost"]["flops"] > 0 for r in majority)
    with (tmp_path / "a" / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert {"accuracy", "pass_at_k", "e3", "auc_oaa", "eff_at_k", "mean_effective_flops"} <= set(summary[0])
    # Same arguments, fresh directory: the same answers and accuracy.
    second = run(llm, tmp_path / "b")
    again = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    key = lambda r: (r["problem"], r["strategy"])  # noqa: E731
    assert [(key(r), r["answer"], r["correct"]) for r in sorted(rows, key=key)] == \
        [(key(r), r["answer"], r["correct"]) for r in sorted(again, key=key)]
    assert [s["accuracy"] for s in first] == [s["accuracy"] for s in second]
    # Resume: nothing is recomputed when everything is there; new problems are added.
    run(llm, tmp_path / "a")
    assert len((tmp_path / "a" / "results.jsonl").read_text().splitlines()) == len(rows)
    run(llm, tmp_path / "a", n=3)
    assert len((tmp_path / "a" / "results.jsonl").read_text().splitlines()) == 3 * 3 * len(STRATEGIES)
