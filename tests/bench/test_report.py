"""The bench's tables from hand-made results: Wilson intervals, seed spread, aggregates
only within a family (and an equally weighted 'all families' row), McNemar pairs; and the
HTML report rendered by a real headless browser, with every figure embedded."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from thinkwise.bench.metrics import mcnemar_exact, wilson_interval
from thinkwise.bench.report import ALL_FAMILIES, console_table, paired_tests, summarize, write_report


def row(family, level, index, strategy, correct, replicate=0, tokens=10, samples=1, truncated=0):
    return {"problem": f"{family}:{level}:{index}", "family": family, "level": level, "strategy": strategy,
            "replicate": replicate, "correct": correct, "max_tokens": 64,
            "samples": [{"answer": "1", "tokens": tokens, "finish": "length" if i < truncated else "stop",
                         "truncated": i < truncated, "correct": correct, "efficiency": None}
                        for i in range(samples)],
            "cost": {"decode_tokens": tokens * samples, "effective_flops": 1e9 * samples, "seconds": 0.5,
                     "prompt_tokens_cached": 0}}


def results():
    """sum level 2: greedy 2/6, majority@4 5/6 (solves 3 more, loses none); hanoi level 3:
    greedy 0/2, majority@4 1/2."""
    rows = [row("sum", 2, i, "greedy", i < 2) for i in range(6)]
    rows += [row("sum", 2, i, "majority@4", i < 5, samples=4, truncated=1) for i in range(6)]
    rows += [row("hanoi", 3, i, "greedy", False, tokens=40) for i in range(2)]
    rows += [row("hanoi", 3, i, "majority@4", i == 0, tokens=40, samples=4) for i in range(2)]
    return rows


def test_summary_intervals_truncation_and_family_weighting():
    summary = summarize(results(), ["greedy", "majority@4"])
    by = {(s["family"], s["level"], s["strategy"]): s for s in summary}
    majority = by[("sum", 2, "majority@4")]
    assert majority["correct"] == 5 and majority["accuracy"] == pytest.approx(5 / 6, abs=1e-4)
    assert (majority["ci_low"], majority["ci_high"]) == pytest.approx(wilson_interval(5, 6), abs=1e-4)
    assert majority["truncated"] == 0.25  # one sample in four hit the limit
    assert majority["mean_decode_tokens"] == 40
    # Families are never pooled by level number; "all families" weights each family equally:
    # majority@4 = (5/6 + 1/2) / 2, not 6/8 as pooling the 8 problems would give.
    assert not any(s["family"] == "all" for s in summary)
    overall = by[(ALL_FAMILIES, "all", "majority@4")]
    assert overall["accuracy"] == pytest.approx((5 / 6 + 1 / 2) / 2, abs=1e-4)
    assert overall["ci_low"] == ""  # not a binomial proportion: no Wilson interval pretended
    text = console_table(summary)
    assert "0.83 [0.44, 0.97]" in text and "5/6" in text


def test_seed_spread_and_mean_over_seeds():
    rows = [row("sum", 2, i, "majority@4", correct, replicate=seed)
            for seed, outcome in enumerate([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
            for i, correct in enumerate(outcome)]
    (s,) = summarize(rows, ["majority@4"])
    assert s["seeds"] == 3 and s["problems"] == 4
    assert s["accuracy"] == pytest.approx(6 / 12, abs=1e-4)
    assert (s["seed_min"], s["seed_max"]) == (0.25, 0.75)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx(wilson_interval(2, 4), abs=1e-4)  # mean count 2 of 4


def test_every_column_is_explained():
    from thinkwise.bench.report import explained

    summary = summarize(results(), ["greedy", "majority@4"])
    tests = paired_tests(results(), ["greedy", "majority@4"])
    columns = set(summary[0]) | set(tests[0])
    assert [c for c in columns if not explained(c)] == []
    assert not explained("no_such_column")


def test_paired_tests_count_discordant_problems():
    tests = paired_tests(results(), ["greedy", "majority@4", "short-1@4"])
    (sum_test,) = [t for t in tests if t["family"] == "sum" and t["strategy"] == "majority@4"]
    assert sum_test["baseline"] == "greedy" and sum_test["pairs"] == 6
    assert (sum_test["strategy_only"], sum_test["baseline_only"]) == (3, 0)
    assert sum_test["p_value"] == pytest.approx(mcnemar_exact(3, 0)) == pytest.approx(0.25)
    # greedy against majority@k: the same pairs seen from the other side.
    (reverse,) = [t for t in tests if t["family"] == "sum" and t["strategy"] == "greedy"]
    assert reverse["baseline"] == "majority@4" and (reverse["strategy_only"], reverse["baseline_only"]) == (0, 3)
    # short-1@4 did not run: no test pretends it did.
    assert not any(t["strategy"] == "short-1@4" for t in tests)


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_embeds_figures_and_renders_in_a_headless_browser(tmp_path):
    write_report(results(), tmp_path, "thinkwise bench: Qwen2.5-Coder-0.5B-Instruct", "thinkwise bench ...",
                 settings={"model": "Qwen2.5-Coder-0.5B-Instruct", "dtype": "bfloat16"},
                 strategies=["greedy", "majority@4"], shortfall={("hanoi", 3): 2}, n_per_level=6)
    page = (tmp_path / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 3  # overview + one per family
    for source in images:
        assert source.startswith("data:image/png;base64,")  # embedded, not a link that breaks when moved
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("Qwen2.5-Coder-0.5B-Instruct", "bfloat16", "ci_low", "auc_oaa", "e3", "Paired tests",
                 "only 2 distinct problems"):
        assert text in page
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on this machine: `make install` installs it (apt-get install chromium)")
    (tmp_path / "report.html").rename(tmp_path / "moved.html")  # works wherever the file goes
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,2400", (tmp_path / "moved.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, tables and plots, not a blank page
    # The figures drew: plot colours (matplotlib's tab10 blue of the first strategy) are on screen.
    pixels = image.load()
    blue = sum(1 for x in range(0, 1200, 2) for y in range(0, 2400, 2)
               if abs(pixels[x, y][0] - 31) < 30 and abs(pixels[x, y][1] - 119) < 30 and pixels[x, y][2] > 150)
    assert blue > 20
