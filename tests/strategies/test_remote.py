"""Strategies over a live `thinkwise serve` as the remote OpenAI-compatible backend."""

from __future__ import annotations

import asyncio

import pytest

from thinkwise import SamplingParams
from thinkwise.strategies import parse_strategy, run_strategy
from thinkwise.strategies.remote import RemoteBackend, RemoteServerError, solve_remote
from thinkwise.tasks.verifiers import ExactChecker
from tests.server.conftest import server, start_server, stop_server  # noqa: F401  (the live server fixture)

PARAMS = SamplingParams(temperature=1.0, max_tokens=24, seed=5)


@pytest.fixture()
def backend(server):  # noqa: F811
    return RemoteBackend(server.url, model=server.model, api_key=server.api_key)


def test_majority_over_the_remote(server, backend):  # noqa: F811
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=5, stop=["a", "e", "o"])
    answer = solve_remote(backend, "count: 1 2 3", "majority@4", sampling_params=params,
                          extract=lambda text: text.strip()[:1] or None)
    assert len(answer.samples) == 4
    assert answer.cost.decode_tokens == sum(s.num_tokens for s in answer.samples) > 0
    assert answer.cost.prompt_tokens > 0 and answer.cost.prompt_tokens_computed > 0  # from usage
    votes = {}
    for s in answer.samples:
        if s.finish_reason == "stop" and s.answer is not None:
            votes[s.answer] = votes.get(s.answer, 0) + 1
    assert votes and answer.votes == votes


def test_abort_closes_the_stream_and_the_server_frees_blocks(server, backend):  # noqa: F811
    async def run():
        group = await backend.start("write words", SamplingParams(n=4, temperature=1.0, max_tokens=200, seed=3))
        while sum(group.num_tokens) == 0:
            await group.next_events()
        output = await group.abort_rest("enough")
        await backend.aclose()
        return group, output

    group, output = asyncio.run(run())
    assert group.finish_reasons == ["abort"] * 4 and group.abort_reasons == ["enough"] * 4
    assert 0 < output.counts.generated_tokens < 4 * 200 and not output.usage_reported
    health = server.wait_idle()
    assert health["engine"]["kv_blocks_used"] == 0 and health["engine"]["running_sequences"] == 0


def test_short_m_at_k_over_the_remote(server, backend):  # noqa: F811
    params = SamplingParams(temperature=1.0, max_tokens=200, seed=3, stop=["e"])
    answer = solve_remote(backend, "write words", "short-1@6", sampling_params=params)
    assert len(answer.samples) == 6 and any(s.finish_reason == "stop" for s in answer.samples)
    # Whatever had not finished when the first did was aborted by closing the stream.
    assert all(s.abort_reason and "short-1@6" in s.abort_reason for s in answer.samples if s.finish_reason == "abort")
    server.wait_idle()


def test_best_of_n_with_an_exact_checker(server, backend):  # noqa: F811
    answer = solve_remote(backend, "say a number", "best-of-3", sampling_params=PARAMS,
                          verifier=ExactChecker(lambda a: a is not None))
    assert len(answer.samples) == 3 and all(s.score is not None for s in answer.samples)


def test_errors_are_clear(server):  # noqa: F811
    wrong_model = RemoteBackend(server.url, model="nope", api_key=server.api_key)
    with pytest.raises(RemoteServerError, match="404"):
        solve_remote(wrong_model, "hi", "majority@2", sampling_params=PARAMS)
    nowhere = RemoteBackend("http://127.0.0.1:9", model="x")
    with pytest.raises(RemoteServerError, match="cannot reach"):
        solve_remote(nowhere, "hi", "majority@2", sampling_params=PARAMS)

    async def budget():
        return await run_strategy(RemoteBackend(server.url, model=server.model), parse_strategy("budget:8"),
                                  [{"role": "user", "content": "x"}], PARAMS)

    from thinkwise.errors import InvalidParameterError
    with pytest.raises(InvalidParameterError, match="remote"):
        asyncio.run(budget())


def test_cli_solve_over_the_remote(server, capsys):  # noqa: F811
    from thinkwise.cli import main

    code = main(["solve", "--backend", "openai", "--base-url", server.url, "--api-key", server.api_key,
                 "--model", server.model, "--strategy", "majority@k", "--k", "3", "--max-tokens", "8",
                 "--temperature", "1.0", "--seed", "1", "hello"])
    out = capsys.readouterr().out
    assert code == 0 and "samples: 3" in out and "answer:" in out
    assert main(["solve", "--backend", "openai", "--strategy", "majority@2", "hi"]) == 2
    assert "--base-url" in capsys.readouterr().err
