"""Tables and plots of a benchmark run: summary.csv, report.html and accuracy-vs-cost PNGs.

One summary row per (strategy, family, level) and per (strategy, level) over all
families: accuracy, pass@k over the strategy's own samples, mean decode tokens, mean
effective FLOPs, mean seconds, E^3, AUC_OAA and, for code tasks, eff@k. The plots put
accuracy against decode tokens, effective FLOPs and seconds, one panel per difficulty
level, each strategy a point, with the Pareto frontier drawn through the points no
other strategy beats on both axes.
"""

from __future__ import annotations

import csv
import html
from collections import defaultdict
from pathlib import Path

from thinkwise.bench.metrics import auc_oaa, e3, eff_at_k, pareto_frontier, pass_at_k

COSTS = (("decode_tokens", "decode tokens"), ("effective_flops", "effective FLOPs (Kinetics)"),
         ("seconds", "seconds per problem"))


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["strategy"], row["family"], row["level"])].append(row)
        groups[(row["strategy"], "all", row["level"])].append(row)
    summary = []
    for (strategy, family, level), items in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        n = len(items)
        accuracy = sum(r["correct"] for r in items) / n
        tokens = [r["cost"]["decode_tokens"] for r in items]
        passes = [pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), len(r["samples"]))
                  for r in items if r["samples"]]
        efficiencies = [[s["efficiency"] for s in r["samples"]] for r in items
                        if r["samples"] and all(s.get("efficiency") is not None for s in r["samples"])]
        mean_tokens = sum(tokens) / n
        summary.append({
            "strategy": strategy, "family": family, "level": level, "problems": n,
            "accuracy": round(accuracy, 4),
            "pass_at_k": round(sum(passes) / len(passes), 4) if passes else "",
            "mean_decode_tokens": round(mean_tokens, 1),
            "mean_effective_flops": sum(r["cost"]["effective_flops"] for r in items) / n,
            "mean_seconds": round(sum(r["cost"]["seconds"] for r in items) / n, 3),
            "e3": round(e3(accuracy, mean_tokens), 6),
            "auc_oaa": round(auc_oaa([r["correct"] for r in items], tokens), 4),
            "eff_at_k": round(sum(eff_at_k(e, len(e)) for e in efficiencies) / len(efficiencies), 4)
            if efficiencies else "",
        })
    return summary


def write_summary_csv(summary: list[dict], path: Path) -> None:
    with path.open("w", newline="") as sink:
        writer = csv.DictWriter(sink, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)


def plot_frontiers(summary: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    # A level means something different in each family (digits, disks ...): one panel per
    # family and level, in a grid with a row per family.
    panels = sorted({(s["family"], s["level"]) for s in summary if s["family"] != "all"})
    families = sorted({f for f, _ in panels})
    columns = max(sum(1 for f, _ in panels if f == family) for family in families)
    paths = []
    for key, label in COSTS:
        column = {"decode_tokens": "mean_decode_tokens", "effective_flops": "mean_effective_flops",
                  "seconds": "mean_seconds"}[key]
        figure, axes = plt.subplots(len(families), columns, figsize=(4.2 * columns, 3.4 * len(families)),
                                    squeeze=False)
        for row, family in enumerate(families):
            levels = [lv for f, lv in panels if f == family]
            for col in range(len(levels), columns):
                axes[row][col].axis("off")
            for col, level in enumerate(levels):
                _panel(axes[row][col], [s for s in summary if s["family"] == family and s["level"] == level],
                       column, label, f"{family}, level {level}", NullFormatter)
        figure.tight_layout()
        path = out_dir / f"accuracy_vs_{key}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def _panel(axis, points, column, label, title, null_formatter) -> None:
    """One family-level: each strategy a point, the Pareto frontier dashed."""
    xy = [(max(float(s[column]), 1e-9), s["accuracy"]) for s in points]
    for s, (x, y) in zip(points, xy):
        axis.scatter(x, y, s=30)
        axis.annotate(s["strategy"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    frontier = pareto_frontier(xy)
    axis.plot([xy[i][0] for i in frontier], [xy[i][1] for i in frontier], "k--", lw=1, label="Pareto frontier")
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(null_formatter())
    axis.set_title(title)
    axis.set_xlabel(label)
    axis.set_ylabel("accuracy")
    axis.set_ylim(-0.05, 1.05)
    axis.legend(fontsize=7, loc="upper left")


def write_html(summary: list[dict], plots: list[Path], path: Path, title: str, command: str) -> None:
    header = "".join(f"<th>{html.escape(k)}</th>" for k in summary[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v if not isinstance(v, float) else f'{v:.4g}'))}</td>"
                                    for v in row.values()) + "</tr>" for row in summary)
    images = "".join(f'<h3>{html.escape(p.stem.replace("_", " "))}</h3><img src="{p.name}" style="max-width:100%">'
                     for p in plots)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}</style></head><body>
<h1>{html.escape(title)}</h1><p><code>{html.escape(command)}</code></p>{images}
<h2>Summary</h2><table><tr>{header}</tr>{body}</table></body></html>""")


def write_report(rows: list[dict], out_dir: Path, title: str, command: str) -> list[dict]:
    summary = summarize(rows)
    write_summary_csv(summary, out_dir / "summary.csv")
    plots = plot_frontiers(summary, out_dir)
    write_html(summary, plots, out_dir / "report.html", title, command)
    return summary
