"""Tables and plots of a benchmark run: summary.csv, paired_tests.csv, PNGs, report.html.

A level means something different in each family (digits, disks, list length), so rows
aggregate within a family only: one per (family, level, strategy) and one per (family,
strategy) over the family's levels (every problem weighted equally), plus, when several
families ran, one "all families" row that weights each family equally (the mean of the
family rows), as stated in the report. Accuracies carry 95% Wilson intervals; with
`--seeds S` the accuracy is the mean over seeds, the interval is computed from the mean
count, and the spread over seeds is given. Paired exact McNemar tests compare each
strategy with greedy and with majority@k on the same problems (seed 0). The figures put
accuracy (with interval bars) against decode tokens, effective FLOPs and seconds, one
figure per family with a row per level, the Pareto frontier drawn, strategies told apart
by a legend (no inline labels, so nothing overlaps), and one overview across families;
the HTML embeds every figure (data URIs), so the one file opens anywhere.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections import defaultdict
from pathlib import Path

from thinkwise.bench.metrics import auc_oaa, e3, eff_at_k, mcnemar_exact, pareto_frontier, pass_at_k, \
    wilson_interval

ALL_FAMILIES = "all families"
ALL_LEVELS = "all"
COSTS = (("mean_decode_tokens", "decode tokens per problem"),
         ("mean_effective_flops", "effective FLOPs per problem (Kinetics)"),
         ("mean_seconds", "seconds per problem (batched)"))

# What every column means, shown in the report under the tables.
GLOSSARY = {
    "family, level": "task family and its difficulty knob (digits, list length, disks ...); 'all' = every level of "
                     "the family, each problem weighted equally; 'all families' = the mean of the family rows, each "
                     "family weighted equally (no interval: it is not one binomial sample)",
    "strategy": "the test-time strategy: greedy, majority@k (vote of k samples), short-m@k (vote of the first m of k "
                "to finish, the rest aborted), adaptive:N (rounds of 4 samples until the vote is decided, at most N)",
    "problems": "distinct problems (a level with fewer distinct instances than asked runs only those)",
    "seeds": "sampling seeds the strategy ran with (greedy is deterministic: 1)",
    "correct": "problems answered correctly (mean over seeds)",
    "accuracy": "correct / problems",
    "ci_low, ci_high": "95% Wilson score interval of the accuracy",
    "seed_min, seed_max": "lowest and highest accuracy over the seeds (with --seeds > 1)",
    "pass_at_k": "share of problems where at least one of the strategy's own samples is correct (unbiased pass@k "
                 "with k = its sample count): what a perfect answer selector would reach",
    "mean_decode_tokens": "tokens sampled per problem over all samples, aborted samples' tokens included",
    "truncated": "share of samples cut off by the token limit (finish 'length'): their answer is usually missing",
    "mean_effective_flops": "Kinetics effective FLOPs per problem as if it ran alone: matmul FLOPs + device "
                            "intensity x bytes moved, with prompt tokens another problem of the batch had cached "
                            "charged at computed cost",
    "mean_prompt_tokens_cached": "prompt tokens per problem served from the prefix cache: the strategy's own earlier "
                                 "rounds (adaptive) plus mean_prompt_tokens_shared; the cache is emptied before "
                                 "each strategy, so no strategy gains from another's prompts",
    "mean_prompt_tokens_shared": "of those, tokens another problem of the same batch had computed (the chat "
                                 "template's common prefix): the batch's cache saving, charged back in "
                                 "mean_effective_flops so costs do not depend on order or batching",
    "mean_seconds": "wall seconds per problem, with all problems of a strategy batched together (latency under load)",
    "max_tokens": "decode limit per sample (the family's default for the level and prompt style, or --max-tokens)",
    "e3": "E^3 = accuracy^2 / mean decode tokens (Plan-and-Budget): rewards accuracy more than thrift",
    "auc_oaa": "AUC_OAA (OptimalThinkingBench): mean over problems of correct x max(0, 1000 - tokens) / 1000",
    "eff_at_k": "eff@k (ENAMEL), code tasks only: expected best runtime efficiency of k samples (0 when wrong)",
    "baseline": "paired tests: the strategy compared with (greedy, and majority@k at the same k, else the largest)",
    "pairs": "paired tests: problems both ran (seed 0)",
    "strategy_correct, baseline_correct": "paired tests: problems each solved",
    "strategy_only, baseline_only": "paired tests: problems only the strategy / only the baseline solved (the "
                                    "discordant pairs McNemar looks at)",
    "p_value": "paired tests: two-sided exact McNemar p-value (small = the difference is unlikely to be chance; "
               "with a few problems even a perfect split of 3 to 0 gives 0.25)",
}


def explained(column: str) -> bool:
    return any(column in [part.strip() for part in key.split(",")] for key in GLOSSARY)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _level_key(level) -> tuple:
    return (1, 0) if level == ALL_LEVELS else (0, level)


def _aggregate(strategy: str, family: str, level, items: list[dict]) -> dict:
    by_seed: dict[int, list[dict]] = defaultdict(list)
    for row in items:
        by_seed[row["replicate"]].append(row)
    problems = len({row["problem"] for row in items})
    seed_accuracy = [_mean(r["correct"] for r in rows) for _, rows in sorted(by_seed.items())]
    accuracy = _mean(r["correct"] for r in items)
    correct = accuracy * problems
    low, high = wilson_interval(correct, problems)
    tokens = [r["cost"]["decode_tokens"] for r in items]
    samples = [s for r in items for s in r["samples"]]
    passes = [pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), len(r["samples"]))
              for r in items if r["samples"]]
    efficiencies = [[s["efficiency"] for s in r["samples"]] for r in items
                    if r["samples"] and all(s.get("efficiency") is not None for s in r["samples"])]
    limits = sorted({r.get("max_tokens") for r in items if r.get("max_tokens") is not None})
    return {
        "family": family, "level": level, "strategy": strategy, "problems": problems, "seeds": len(by_seed),
        "correct": round(correct, 2), "accuracy": round(accuracy, 4), "ci_low": round(low, 4),
        "ci_high": round(high, 4),
        "seed_min": round(min(seed_accuracy), 4) if len(by_seed) > 1 else "",
        "seed_max": round(max(seed_accuracy), 4) if len(by_seed) > 1 else "",
        "pass_at_k": round(_mean(passes), 4) if passes else "",
        "mean_decode_tokens": round(_mean(tokens), 1),
        "truncated": round(_mean(s.get("truncated", s.get("finish") == "length") for s in samples), 4)
        if samples else "",
        "mean_effective_flops": _mean(r["cost"].get("effective_flops_alone", r["cost"]["effective_flops"])
                                      for r in items),
        "mean_prompt_tokens_cached": round(_mean(r["cost"]["prompt_tokens_cached"] for r in items), 1),
        "mean_prompt_tokens_shared": round(_mean(r["cost"].get("prompt_tokens_shared", 0) for r in items), 1),
        "mean_seconds": round(_mean(r["cost"]["seconds"] for r in items), 3),
        "max_tokens": "/".join(map(str, limits)),
        "e3": round(e3(accuracy, _mean(tokens)), 6),
        "auc_oaa": round(auc_oaa([r["correct"] for r in items], tokens), 4),
        "eff_at_k": round(_mean(eff_at_k(e, len(e)) for e in efficiencies), 4) if efficiencies else "",
    }


def summarize(rows: list[dict], strategies: list[str] | None = None) -> list[dict]:
    """Summary rows, ordered by family, level (each family's 'all' last), then strategy in the
    order given. eff_at_k is dropped when no code task ran (it means nothing elsewhere)."""
    order = {name: i for i, name in enumerate(strategies or sorted({r["strategy"] for r in rows}))}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["family"], row["level"], row["strategy"])].append(row)
        groups[(row["family"], ALL_LEVELS, row["strategy"])].append(row)
    families = sorted({r["family"] for r in rows})
    summary = []
    for family in families:
        levels = sorted({lv for f, lv, _ in groups if f == family}, key=_level_key)
        if len(levels) == 2:  # one level: its 'all' row would repeat it
            levels = levels[:1]
        for level in levels:
            for strategy in sorted({s for f, lv, s in groups if f == family and lv == level},
                                   key=lambda s: order.get(s, len(order))):
                summary.append(_aggregate(strategy, family, level, groups[(family, level, strategy)]))
    if len(families) > 1:
        for strategy in sorted({r["strategy"] for r in rows}, key=lambda s: order.get(s, len(order))):
            per_family = [s for s in summary if s["strategy"] == strategy and
                          (s["level"] == ALL_LEVELS or sum(1 for t in summary if t["family"] == s["family"]
                                                           and t["strategy"] == strategy) == 1)]
            if len(per_family) < len(families):
                continue  # the strategy did not run on every family: no equal-weight mean
            overall = {key: "" for key in per_family[0]}
            overall.update(family=ALL_FAMILIES, level=ALL_LEVELS, strategy=strategy,
                           problems=sum(s["problems"] for s in per_family), seeds=max(s["seeds"] for s in per_family))
            for key in ("accuracy", "pass_at_k", "mean_decode_tokens", "truncated", "mean_effective_flops",
                        "mean_prompt_tokens_cached", "mean_prompt_tokens_shared", "mean_seconds", "auc_oaa"):
                values = [s[key] for s in per_family if s[key] != ""]
                if len(values) == len(per_family):
                    digits = {"mean_decode_tokens": 1, "mean_prompt_tokens_cached": 1, "mean_prompt_tokens_shared": 1,
                              "mean_seconds": 3}.get(key, 4)
                    overall[key] = round(_mean(values), digits) if key != "mean_effective_flops" else _mean(values)
            overall["e3"] = round(e3(overall["accuracy"], overall["mean_decode_tokens"]), 6)
            summary.append(overall)
    if all(s["eff_at_k"] == "" for s in summary):
        for s in summary:
            del s["eff_at_k"]
    return summary


def majority_baseline(strategy: str, strategies: list[str]) -> str | None:
    """The majority@k to compare `strategy` with: the same k where it ran, else the largest k."""
    from thinkwise.strategies import parse_strategy

    majorities = [(parse_strategy(s).k, s) for s in strategies if parse_strategy(s).kind == "majority"]
    if not majorities:
        return None
    k = parse_strategy(strategy).k
    same = [s for kk, s in majorities if kk == k]
    return same[0] if same else max(majorities)[1]


def paired_tests(rows: list[dict], strategies: list[str]) -> list[dict]:
    """Exact McNemar of every strategy against greedy and against majority@k, per family and
    level and per family over its levels, on the problems both ran with seed 0."""
    correct: dict[tuple, bool] = {(r["strategy"], r["problem"]): bool(r["correct"]) for r in rows
                                  if r["replicate"] == 0}
    problems: dict[tuple, set] = defaultdict(set)
    for r in rows:
        problems[(r["family"], r["level"])].add(r["problem"])
        problems[(r["family"], ALL_LEVELS)].add(r["problem"])
    out = []
    for (family, level), ids in sorted(problems.items(), key=lambda kv: (kv[0][0], _level_key(kv[0][1]))):
        if level == ALL_LEVELS and sum(1 for f, _ in problems if f == family) == 2:
            continue
        for strategy in strategies:
            baselines = [b for b in dict.fromkeys(["greedy" if "greedy" in strategies else None,
                                                   majority_baseline(strategy, strategies)])
                         if b is not None and b != strategy]
            for baseline in baselines:
                pairs = [(correct[(strategy, p)], correct[(baseline, p)]) for p in sorted(ids)
                         if (strategy, p) in correct and (baseline, p) in correct]
                if not pairs:
                    continue
                only_strategy = sum(1 for a, b in pairs if a and not b)
                only_baseline = sum(1 for a, b in pairs if b and not a)
                out.append({"family": family, "level": level, "strategy": strategy, "baseline": baseline,
                            "pairs": len(pairs), "strategy_correct": sum(a for a, _ in pairs),
                            "baseline_correct": sum(b for _, b in pairs), "strategy_only": only_strategy,
                            "baseline_only": only_baseline,
                            "p_value": round(mcnemar_exact(only_strategy, only_baseline), 4)})
    return out


def write_csv(table: list[dict], path: Path) -> None:
    with path.open("w", newline="") as sink:
        if not table:
            return
        writer = csv.DictWriter(sink, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def interval_text(row: dict) -> str:
    if row.get("ci_low", "") == "":
        return f"{row['accuracy']:.2f}"
    return f"{row['accuracy']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def console_table(summary: list[dict]) -> str:
    """Accuracy with its interval, tokens and truncation per family and level, for the terminal."""
    lines = [f"{'family':<13}{'level':>6}  {'strategy':<14}{'accuracy [95% CI]':<22}{'correct':>9}"
             f"{'tokens':>9}{'truncated':>10}{'seconds':>9}"]
    for row in summary:
        spread = f"  seeds {row['seed_min']:.2f}-{row['seed_max']:.2f}" if row.get("seed_min", "") != "" else ""
        correct = f"{row['correct']:g}/{row['problems']}" if row["family"] != ALL_FAMILIES else ""
        truncated = f"{row['truncated']:.0%}" if row["truncated"] != "" else ""
        lines.append(f"{row['family']:<13}{row['level']!s:>6}  {row['strategy']:<14}{interval_text(row):<22}"
                     f"{correct:>9}{row['mean_decode_tokens']:>9}{truncated:>10}{row['mean_seconds']:>9}{spread}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
MARKERS = "osD^vP*Xhp<>"
LEGEND_INCHES = 0.55  # the figure's bottom strip, for the shared legend


def strategy_styles(strategies: list[str]) -> dict[str, tuple]:
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    return {s: (colours[i % 10], MARKERS[i % len(MARKERS)]) for i, s in enumerate(strategies)}


def _panel(axis, points: list[dict], column: str, label: str, title: str, styles: dict) -> None:
    """One family-level on one cost axis: a point per strategy with its Wilson bar, and the
    Pareto frontier (lower cost, higher accuracy) as a grey step line through its points."""
    from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

    xy = [(max(float(p[column]), 1e-9), float(p["accuracy"])) for p in points]
    frontier = pareto_frontier(xy)
    fx, fy = [xy[i][0] for i in frontier], [xy[i][1] for i in frontier]
    if len(frontier) > 1:
        axis.step(fx, fy, where="post", color="0.55", lw=1.2, ls="--", zorder=1)
    axis.scatter(fx, fy, s=190, facecolors="none", edgecolors="0.55", lw=1.2, zorder=1)
    for point, (x, y) in zip(points, xy):
        colour, marker = styles[point["strategy"]]
        if point.get("ci_low", "") != "":
            axis.errorbar(x, y, yerr=[[y - point["ci_low"]], [point["ci_high"] - y]], color=colour, lw=1,
                          capsize=3, zorder=2)
        axis.scatter(x, y, color=colour, marker=marker, s=55, zorder=3, edgecolors="black", linewidths=0.4)
    axis.set_xscale("log")
    # Ticks at 1-2-5 steps (FLOPs in engineering units: 5G): a narrow range on
    # a log axis otherwise shows one labelled tick or none.
    axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(EngFormatter(sep="") if column == "mean_effective_flops"
                                   else FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(label, fontsize=9)
    axis.set_ylabel("accuracy", fontsize=9)
    axis.set_ylim(-0.05, 1.05)
    axis.grid(alpha=0.3)
    low, high = min(x for x, _ in xy), max(x for x, _ in xy)
    axis.set_xlim(low / 1.6, high * 1.6)


def _legend(figure, styles: dict) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker=m, ls="", markersize=8, markeredgecolor="black", label=s)
               for s, (c, m) in styles.items()]
    handles.append(Line2D([], [], color="0.55", ls="--", marker="o", markerfacecolor="none", markersize=11,
                          label="Pareto frontier (ringed)"))
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)


def plot_family(summary: list[dict], family: str, styles: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    levels = sorted({s["level"] for s in summary if s["family"] == family}, key=_level_key)
    rows = len(levels)
    height = 3.2 * rows + LEGEND_INCHES
    figure, axes = plt.subplots(rows, len(COSTS), figsize=(4.3 * len(COSTS), height), squeeze=False)
    for r, level in enumerate(levels):
        points = [s for s in summary if s["family"] == family and s["level"] == level]
        name = "all levels" if level == ALL_LEVELS else f"level {level}"
        for c, (column, label) in enumerate(COSTS):
            _panel(axes[r][c], points, column, label, f"{family}, {name} ({points[0]['problems']} problems)", styles)
    figure.tight_layout(rect=(0, LEGEND_INCHES / height, 1, 1))
    _legend(figure, {s: styles[s] for s in styles if any(p["strategy"] == s and p["family"] == family
                                                          for p in summary)})
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_overview(summary: list[dict], styles: dict, path: Path) -> Path:
    """One panel per family (its levels together, problems weighted equally): accuracy vs
    decode tokens, the same strategies in the same colours everywhere."""
    import matplotlib.pyplot as plt

    families = sorted({s["family"] for s in summary if s["family"] != ALL_FAMILIES})
    per_family = {f: [s for s in summary if s["family"] == f and s["level"] == ALL_LEVELS] or
                  [s for s in summary if s["family"] == f] for f in families}
    columns = min(len(families), 3)
    rows = (len(families) + columns - 1) // columns
    height = 3.4 * rows + LEGEND_INCHES
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, height), squeeze=False)
    for i, family in enumerate(families):
        points = per_family[family]
        levels = sorted({s["level"] for s in summary if s["family"] == family and s["level"] != ALL_LEVELS})
        _panel(axes[i // columns][i % columns], points, "mean_decode_tokens", "decode tokens per problem",
               f"{family}, levels {'/'.join(map(str, levels))} ({points[0]['problems']} problems)", styles)
    for j in range(len(families), rows * columns):
        axes[j // columns][j % columns].axis("off")
    figure.tight_layout(rect=(0, LEGEND_INCHES / height, 1, 1))
    _legend(figure, styles)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_all(summary: list[dict], out_dir: Path, strategies: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    styles = strategy_styles([s for s in strategies if any(r["strategy"] == s for r in summary)])
    for old in out_dir.glob("accuracy_*.png"):
        old.unlink()  # figures of families no longer in the run must not linger
    paths = [plot_overview(summary, styles, out_dir / "accuracy_overview.png")]
    for family in sorted({s["family"] for s in summary if s["family"] != ALL_FAMILIES}):
        paths.append(plot_family(summary, family, styles, out_dir / f"accuracy_{family}.png"))
    return paths


# ------------------------------------------------------------------------------ HTML
def _cell(value) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape(str(value))


def _table(table: list[dict]) -> str:
    if not table:
        return "<p>(none)</p>"
    header = "".join(f"<th>{html.escape(k)}</th>" for k in table[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row.values()) + "</tr>" for row in table)
    return f"<table><tr>{header}</tr>{body}</table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_html(summary: list[dict], tests: list[dict], plots: list[Path], path: Path, title: str, command: str,
               settings: dict, notes: list[str]) -> None:
    setting_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                           for k, v in settings.items())
    images = "".join(f'<h3>{html.escape(p.stem.replace("accuracy_", "").replace("_", " "))}</h3>'
                     f'<img alt="{html.escape(p.stem)}" src="{_data_uri(p)}">' for p in plots)
    glossary = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in GLOSSARY.items()
                       if k != "eff_at_k" or any("eff_at_k" in s for s in summary))
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;font-size:12px;
margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}img{{max-width:100%}}
.settings th{{text-align:left;background:#f4f4f4}}dt{{font-weight:bold;margin-top:.4em}}</style></head><body>
<h1>{html.escape(title)}</h1>
<table class="settings">{setting_rows}</table>
<p>Command: <code>{html.escape(command)}</code></p>
<ul>{note_html}</ul>
<h2>Figures</h2>{images}
<h2>Summary</h2>{_table(summary)}
<h2>Paired tests</h2>{_table(tests)}
<h2>Columns</h2><dl>{glossary}</dl>
</body></html>""")


def write_report(rows: list[dict], out_dir: Path, title: str, command: str, *, settings: dict | None = None,
                 strategies: list[str] | None = None, shortfall: dict | None = None,
                 n_per_level: int | None = None) -> list[dict]:
    strategies = strategies or list(dict.fromkeys(r["strategy"] for r in rows))
    settings = dict(settings or {})
    notes = ["Every strategy ran on the same problems with the same per-problem sampling seeds, each from an empty "
             "prefix cache.",
             "Aggregates stay within a family; 'all families' weights each family equally."]
    for (family, level), count in sorted((shortfall or {}).items()):
        notes.append(f"{family} level {level}: only {count} distinct problem{'s' if count != 1 else ''} exist"
                     f"{f' (asked for {n_per_level})' if n_per_level else ''}; no repeats were run.")
    (out_dir / "report_inputs.json").write_text(json.dumps(
        {"title": title, "command": command, "settings": settings, "strategies": strategies, "notes": notes}))
    summary = summarize(rows, strategies)
    tests = paired_tests(rows, strategies)
    write_csv(summary, out_dir / "summary.csv")
    write_csv(tests, out_dir / "paired_tests.csv")
    plots = plot_all(summary, out_dir, strategies)
    write_html(summary, tests, plots, out_dir / "report.html", title, command, settings, notes)
    return summary


def rebuild_report(out_dir: str | Path) -> list[dict]:
    """Rewrite the tables, figures and report of a finished run from its results.jsonl."""
    from thinkwise.bench.runner import read_rows

    out = Path(out_dir)
    inputs = json.loads((out / "report_inputs.json").read_text())
    rows = [r for r in read_rows(out) if r["strategy"] in inputs["strategies"]]
    summary = summarize(rows, inputs["strategies"])
    tests = paired_tests(rows, inputs["strategies"])
    write_csv(summary, out / "summary.csv")
    write_csv(tests, out / "paired_tests.csv")
    plots = plot_all(summary, out, inputs["strategies"])
    write_html(summary, tests, plots, out / "report.html", inputs["title"], inputs["command"], inputs["settings"],
               inputs["notes"])
    return summary
