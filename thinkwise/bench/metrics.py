"""Accuracy-vs-cost metrics of a benchmark run.

- pass@k: the unbiased estimator 1 - C(n-c, k)/C(n, k) from n samples with c correct.
- E^3 = A^2 / T (Plan-and-Budget): accuracy squared over mean tokens.
- AUC_OAA (OptimalThinkingBench): mean over items of correct_i x max(0, t_max - tokens_i) /
  t_max with t_max = 1000 tokens: accuracy that rewards answering in few tokens.
- eff@k (ENAMEL): from n samples with efficiency scores e_i (0 when wrong), sorted
  ascending, eff@k = sum_i C(i-1, k-1) / C(n, k) x e_(i): the expected best efficiency of
  k samples drawn without replacement.
- Pareto frontier: the points no other point beats on both cost (lower) and accuracy
  (higher).
"""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def e3(accuracy: float, mean_tokens: float) -> float:
    return accuracy**2 / mean_tokens if mean_tokens > 0 else 0.0


def auc_oaa(correct: list[bool], tokens: list[float], t_max: float = 1000.0) -> float:
    if not correct:
        return 0.0
    return sum(c * max(0.0, t_max - t) / t_max for c, t in zip(correct, tokens)) / len(correct)


def eff_at_k(efficiencies: list[float], k: int) -> float:
    n = len(efficiencies)
    if not 1 <= k <= n:
        raise ValueError(f"eff@k needs 1 <= k <= n, got k={k}, n={n}")
    ordered = sorted(efficiencies)
    return sum(comb(i - 1, k - 1) * e for i, e in enumerate(ordered, 1)) / comb(n, k)


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points on the frontier, by increasing cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    frontier, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier
