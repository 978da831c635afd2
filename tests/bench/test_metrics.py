"""The bench's metrics against hand-computed cases: pass@k, E^3, AUC_OAA, eff@k, Pareto
frontier, the Wilson score interval and the exact McNemar test."""

from __future__ import annotations

import pytest

from thinkwise.bench.metrics import auc_oaa, e3, eff_at_k, mcnemar_exact, pareto_frontier, pass_at_k, \
    wilson_interval


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


@pytest.mark.parametrize("correct, n, low, high", [
    # By hand, z = 1.96: 5/10: centre (0.5 + 0.19208)/1.38416 = 0.5, half 1.96/1.38416 x
    # sqrt(0.025 + 0.009604) = 0.26340 -> [0.2366, 0.7634].
    (5, 10, 0.2366, 0.7634),
    # 0/10: centre 0.19208/1.38416 = 0.13877, half 1.41600 x sqrt(0.009604) = 0.13877 -> [0, 0.2775].
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),  # mirror image of 0/10
    # 1/3: p = 1/3, z^2/n = 1.28053; centre (0.33333 + 0.64027)/2.28053 = 0.42692; half
    # 1.96/2.28053 x sqrt(0.074074 + 0.106713) = 0.36542 -> [0.0615, 0.7923].
    (1, 3, 0.0615, 0.7923),
    # 18/20 = 0.9: centre (0.9 + 0.096040)/1.192072 = 0.835554; half 1.644196 x sqrt(0.0045 +
    # 0.0024010) = 0.136578 -> [0.6990, 0.9721].
    (18, 20, 0.6990, 0.9721),
])
def test_wilson_interval_by_hand(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((low, high), abs=6e-5)


def test_wilson_interval_rejects_nonsense():
    for correct, n in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="Wilson"):
            wilson_interval(correct, n)


@pytest.mark.parametrize("b, c, p", [
    (0, 0, 1.0),  # no disagreement: no evidence either way
    (3, 0, 0.25),  # 2 x (1/2)^3
    (0, 3, 0.25),  # symmetric
    (5, 0, 0.0625),  # 2 x 1/32
    (6, 1, 0.125),  # 2 x (1 + 7)/128
    (8, 2, 0.109375),  # 2 x (1 + 10 + 45)/1024 = 112/1024
    (2, 2, 1.0),  # min(1, 2 x 11/16)
    (1, 2, 1.0),  # min(1, 2 x (1 + 3)/8)
])
def test_mcnemar_exact_by_hand(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_exact(-1, 2)
