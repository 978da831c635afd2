"""Sampler: greedy, filters restrict the support, seeds reproduce, the draw follows p."""

from __future__ import annotations

import torch

from thinkwise.engine.sampler import Sampler, SamplingRow, greedy_tokens


def row(**kw) -> SamplingRow:
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, position=0, logprobs=None)
    base.update(kw)
    return SamplingRow(**base)


LOGITS = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))


def draws(n: int, **kw) -> list[int]:
    sampler = Sampler("cpu")
    rows = [row(seed=s, **kw) for s in range(n)]
    return sampler(LOGITS.repeat(n, 1), rows).token_ids


def test_greedy_is_argmax():
    assert draws(5, temperature=0.0) == [0] * 5


def test_greedy_tokens_is_torch_argmax_on_every_edge():
    """The CPU fast path (NumPy's argmax) against torch.argmax: ties take the first index, a
    NaN counts as the largest value, an all -inf row gives 0; non-contiguous and non-fp32
    logits take torch's path."""
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [-inf, -inf, -inf, -inf], [0.0, nan, 5.0, nan],
                           [2.0, 2.0, 2.0, 2.0], [-1.0, -2.0, -0.5, inf]])
    assert greedy_tokens(logits).tolist() == logits.argmax(dim=-1).tolist() == [1, 0, 1, 0, 3]
    big = torch.randn(6, 151_936, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy_tokens(big), big.argmax(dim=-1))
    assert torch.equal(greedy_tokens(big.t().contiguous().t()), big.argmax(dim=-1))  # strided
    assert greedy_tokens(big.bfloat16()).dtype == torch.long
    assert greedy_tokens(big[:0]).shape == (0,)


def test_top_k_top_p_min_p_restrict_support():
    assert set(draws(400, top_k=2)) == {0, 1}
    assert set(draws(400, top_p=0.7)) == {0, 1}  # 0.4 + 0.3 reaches 0.7
    assert set(draws(400, top_p=0.71)) == {0, 1, 2}
    assert set(draws(400, min_p=0.3)) == {0, 1, 2}  # keeps p >= 0.3 * 0.4
    assert set(draws(400)) == {0, 1, 2, 3, 4}


def test_frequencies_follow_probabilities():
    counts = torch.bincount(torch.tensor(draws(4000)), minlength=5).float() / 4000
    assert torch.allclose(counts, LOGITS.exp(), atol=0.03)


def test_low_temperature_sharpens():
    assert draws(300, temperature=0.05).count(0) > 290


def test_seed_and_position_determine_the_draw():
    sampler = Sampler("cpu")
    logits = torch.randn(1, 1000)
    a = sampler(logits.clone(), [row(seed=42, position=3)]).token_ids
    b = sampler(torch.cat([torch.randn(2, 1000), logits]), [row(seed=1), row(seed=2), row(seed=42, position=3)]).token_ids
    assert b[2] == a[0]
    different = {sampler(logits.clone(), [row(seed=42, position=p)]).token_ids[0] for p in range(20)}
    assert len(different) > 1


def test_banned_tokens_never_drawn():
    assert 0 not in draws(200, banned_token_ids=(0,))


def test_banning_leaves_the_callers_logits_alone():
    logits = torch.randn(2, 50)
    before = logits.clone()
    Sampler("cpu")(logits, [row(seed=1, banned_token_ids=(0, 3)), row(seed=2)])
    assert torch.equal(logits, before)


def test_top_p_with_a_nucleus_wider_than_the_candidate_window():
    sampler = Sampler("cpu")
    logits = torch.zeros(1, 5000)  # uniform: one tie, so the whole vocabulary is the nucleus
    rows = [row(seed=s, top_p=0.9) for s in range(3000)]
    tokens = sampler(logits.repeat(len(rows), 1), rows).token_ids
    assert max(tokens) > 1024  # reached beyond the first-pass window
    assert len(set(tokens)) > 1500


def test_top_p_keeps_or_drops_a_tie_whole_whatever_the_order():
    """bf16 logits tie often; topk/sort leave ties in an unspecified order, so a nucleus
    cut through a tie would depend on that order (and differ run to run on a GPU)."""
    from thinkwise.engine.sampler import Sampler as S

    logits = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    for top_p, kept in ((0.4, 1), (0.5, 3), (0.7, 3), (0.85, 5)):
        probs, _ = S._filtered_probs(logits, [row(top_p=top_p)])
        assert int((probs > 0).sum()) == kept, top_p
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (1, 3000), generator=generator).float() / 2  # many ties
    for top_p in (0.3, 0.6, 0.9):
        base, _ = S._filtered_probs(values, [row(top_p=top_p)])
        for _ in range(3):
            perm = torch.randperm(values.shape[1], generator=generator)
            permuted, _ = S._filtered_probs(values[:, perm], [row(top_p=top_p)])
            assert torch.equal(permuted > 0, base[:, perm] > 0)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    # Exact binary fractions: after the first token the kept mass is exactly p = 1/2, so the
    # next token is not needed (a cut at "mass before <= p" would wrongly keep it).
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    probs, _ = Sampler._filtered_probs(logits, [row(top_p=0.5)])
    assert (probs[0] > 0).tolist() == [True, False, False, False]
    probs, _ = Sampler._filtered_probs(logits, [row(top_p=0.75)])
    assert (probs[0] > 0).tolist() == [True, True, False, False]


def test_the_per_position_uniforms_are_never_degenerate():
    # u near 0 or 1 would pin a sample to the first or last token of the CDF whatever the logits.
    from thinkwise.engine.sampler import mix_seed, uniform_from_seed

    values = [uniform_from_seed(seed, position) for seed in range(32) for position in range(64)]
    assert min(values) > 1e-6 and max(values) < 1 - 1e-6
    assert len({mix_seed(seed, salt) for seed in range(32) for salt in range(64)}) == 32 * 64


def test_only_rows_without_logprobs_or_banned_ids_are_drawn_without_the_host():
    assert Sampler.device_ready(row())
    assert not Sampler.device_ready(row(logprobs=0))
    assert not Sampler.device_ready(row(banned_token_ids=(3,)))
    assert not Sampler.device_ready(row(logprobs=2, banned_token_ids=(3,)))
