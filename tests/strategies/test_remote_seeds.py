"""Per-sample seeds of the remote backend never collide (the server's `seed + i` would)."""

from __future__ import annotations

from thinkwise.bench.runner import problem_seed
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.strategies.remote import RemoteBackend, sample_seed
from thinkwise.tasks import Problem

ADAPTIVE_ROUND_STRIDE = 1_000_003  # voting.adaptive seeds round r with base + stride * r


def test_the_scheme_seed_plus_i_collides_and_hashing_does_not():
    # What the issue saw on vLLM: seed 1's sample 0 is seed 0's sample 1.
    assert {0 + i for i in range(4)} & {1 + i for i in range(4)}
    assert not {sample_seed(0, i) for i in range(4)} & {sample_seed(1, i) for i in range(4)}


def test_no_overlap_across_consecutive_base_seeds_rounds_and_samples():
    seeds = [sample_seed(base + ADAPTIVE_ROUND_STRIDE * round_index, i)
             for base in range(200) for round_index in range(8) for i in range(16)]
    assert len(set(seeds)) == len(seeds) == 200 * 8 * 16
    assert all(0 <= s < 2**63 for s in seeds)  # a valid int64 seed for vLLM and thinkwise


def test_no_overlap_across_the_bench_per_problem_seeds():
    problems = [Problem(family="arithmetic", level=1 + n % 3, seed=n, prompt="?", reference="0") for n in range(500)]
    for run_seed in (0, 1):
        seeds = [sample_seed(problem_seed(run_seed, p) + ADAPTIVE_ROUND_STRIDE * r, i)
                 for p in problems for r in range(4) for i in range(8)]
        assert len(set(seeds)) == len(seeds)


def test_a_seeded_group_goes_as_n1_requests_with_derived_seeds():
    backend = RemoteBackend("http://127.0.0.1:9/v1", model="m")
    _, body = backend.request_body("hi", SamplingParams(n=4, seed=7, max_tokens=8))
    bodies = backend.group_bodies(body, 4)
    assert [offset for offset, _ in bodies] == [0, 1, 2, 3]
    assert all(b["n"] == 1 for _, b in bodies)
    assert [b["seed"] for _, b in bodies] == [sample_seed(7, i) for i in range(4)]
    # One sample alone gets a derived seed too, so greedy/best-of-1 rounds do not reuse seed 7's draws.
    assert [b["seed"] for _, b in backend.group_bodies({**body, "n": 1}, 1)] == [sample_seed(7, 0)]
    # n=k on one request only when asked for; the server then seeds its samples its own way.
    shared = RemoteBackend("http://127.0.0.1:9", model="m", per_sample_requests=False)
    assert shared.group_bodies(body, 4) == [(0, body)]
