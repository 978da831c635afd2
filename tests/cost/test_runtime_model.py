"""The idealized runtime model recovers a known law and reports its held-out error."""

from __future__ import annotations

import pytest

from thinkwise.cost import ProfiledRun, RuntimeModel, profile, split_held_out


def grid(law: RuntimeModel, scale: float = 1.0) -> list[ProfiledRun]:
    return [ProfiledRun(p, o, law.predict(p, o) * scale) for p in (10, 50, 200) for o in (1, 8, 32)]


def test_fit_recovers_f_and_g():
    truth = RuntimeModel(intercept_s=0.05, per_prompt_token_s=0.001, per_output_token_s=0.02)
    fitted = RuntimeModel.fit(grid(truth))
    assert fitted.intercept_s == pytest.approx(0.05)
    assert fitted.per_prompt_token_s == pytest.approx(0.001)
    assert fitted.per_output_token_s == pytest.approx(0.02)
    assert fitted.prefill_s(100) == pytest.approx(0.05 + 0.1)
    assert fitted.predict(100, 11) == pytest.approx(0.15 + 10 * 0.02)
    assert fitted.error_on(grid(truth)) == pytest.approx(0.0, abs=1e-9)


def test_error_is_the_mean_absolute_percentage():
    truth = RuntimeModel(0.05, 0.001, 0.02)
    fitted = RuntimeModel.fit(grid(truth))
    # every run 10% slower than predicted: |p - 1.1 p| / 1.1 p = 1/11
    assert fitted.error_on(grid(truth, scale=1.1)) == pytest.approx(100 / 11)
    mixed = [ProfiledRun(10, 1, truth.predict(10, 1) * 2), ProfiledRun(50, 8, truth.predict(50, 8) / 2)]
    assert fitted.error_on(mixed) == pytest.approx(100 * (0.5 + 1.0) / 2)


def test_fit_refuses_runs_that_cannot_identify_the_law():
    runs = grid(RuntimeModel(0.05, 0.001, 0.02))
    with pytest.raises(ValueError):
        RuntimeModel.fit(runs[:2])
    with pytest.raises(ValueError):  # one prompt length: intercept and slope are not separable
        RuntimeModel.fit([r for r in runs if r.prompt_tokens == 10])


def test_noisy_runs_fit_close_and_held_out_error_is_reported():
    truth = RuntimeModel(0.2, 0.002, 0.05)
    wobble = [1.03, 0.97, 1.01, 0.99, 1.02, 0.98]
    runs = [ProfiledRun(p, o, truth.predict(p, o) * wobble[(i + j) % 6])
            for i, p in enumerate((16, 64, 128, 256)) for j, o in enumerate((1, 8, 24, 48))]
    fit, held_out = split_held_out(runs)
    fitted = RuntimeModel.fit(fit)
    assert fitted.per_output_token_s == pytest.approx(0.05, rel=0.05)
    assert fitted.error_on(held_out) < 5.0


def test_split_is_a_checkerboard_over_the_grid():
    runs = [ProfiledRun(p, o, 1.0) for p in (1, 2, 3) for o in (1, 5)]
    fit, held_out = split_held_out(runs)
    assert [(r.prompt_tokens, r.output_tokens) for r in fit] == [(1, 1), (2, 5), (3, 1)]
    assert [(r.prompt_tokens, r.output_tokens) for r in held_out] == [(1, 5), (2, 1), (3, 5)]
    fit2, held2 = split_held_out(runs + runs)  # a repeat of a point lands in the other half
    assert len(fit2) == len(held2) == 6 and {(r.prompt_tokens, r.output_tokens) for r in held2} == {
        (r.prompt_tokens, r.output_tokens) for r in runs}


def test_profile_times_every_grid_point():
    calls = []
    runs = profile(lambda p, o: calls.append((p, o)), [4, 8], [1, 3], repeats=2)
    assert calls == [(4, 1), (4, 3), (8, 1), (8, 3)] * 2
    assert [(r.prompt_tokens, r.output_tokens) for r in runs] == calls
    assert all(r.seconds >= 0 for r in runs)
