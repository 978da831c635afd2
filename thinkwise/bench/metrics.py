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
- Wilson score interval (95%): for c correct of n, centre (p + z^2/2n) / (1 + z^2/n) and
  half-width z / (1 + z^2/n) x sqrt(p(1-p)/n + z^2/4n^2), z = 1.959964; unlike p +- z x
  sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at 0/n or n/n.
- Exact McNemar test: of the problems two strategies disagree on, b are solved only by
  the first and c only by the second; under "equally good" each disagreement is a fair
  coin, so the two-sided p-value is min(1, 2 x P(Binomial(b + c, 1/2) <= min(b, c))).
"""

from __future__ import annotations

from math import comb, sqrt

Z95 = 1.959963984540054


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `correct`/`n` (`correct` may be a mean
    count over seeds, so fractional)."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"a Wilson interval needs n >= 1 and 0 <= correct <= n, got correct={correct}, n={n}")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts b and c."""
    if only_first < 0 or only_second < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_first}, {only_second}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(only_first, only_second) + 1)) / 2**n
    return min(1.0, 2 * tail)


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
