"""DeepConf over a live `thinkwise serve`: token confidences from the server's streamed top logprobs."""

from __future__ import annotations

import asyncio
import math

import pytest

from thinkwise import SamplingParams
from thinkwise.errors import InvalidParameterError
from thinkwise.strategies import parse_strategy, run_strategy
from thinkwise.strategies.deepconf import trace_score
from thinkwise.strategies.remote import RemoteBackend, solve_remote
from tests.server.conftest import server, start_server, stop_server  # noqa: F401  (the live server fixture)


def test_deepconf_reads_confidences_from_top_logprobs(server):  # noqa: F811
    backend = RemoteBackend(server.url, model=server.model, api_key=server.api_key)
    seen = {}

    class Watching(RemoteBackend):
        async def start(self, prompt, params):
            group = await super().start(prompt, params)
            seen["group"], seen["params"] = group, params
            return group

    watching = Watching(server.url, model=server.model, api_key=server.api_key)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=4)
    answer = solve_remote(watching, "count: 1 2 3", "deepconf@3(confidence_k=5, window=4, eta=100)",
                          sampling_params=params, extract=lambda text: text.strip()[:1] or None)
    group = seen["group"]
    assert seen["params"].confidence_top_k == 5
    for i, sample in enumerate(answer.samples):
        # One confidence per streamed token: -mean of 5 log-probabilities, so at least -log(1) = 0.
        assert len(group.token_confidences[i]) == sample.num_tokens > 0
        assert all(c >= 0 and math.isfinite(c) for c in group.token_confidences[i])
        assert sample.score == pytest.approx(trace_score(group.token_confidences[i], 4))
    voted = {}
    for s in answer.samples:
        if s.finish_reason == "stop" and s.answer is not None:
            voted[s.answer] = voted.get(s.answer, 0.0) + s.score
    assert answer.votes == pytest.approx(voted)
    # More than the API's 20 top logprobs cannot be asked of a remote server.
    with pytest.raises(InvalidParameterError) as error:
        asyncio.run(run_strategy(backend, parse_strategy("deepconf@2(confidence_k=21)"),
                                 [{"role": "user", "content": "q"}], params))
    assert error.value.param == "confidence_k"


@pytest.mark.parametrize("thinkwise, field", [
    ({"strategy": "deepconf@4", "eta": 0}, "thinkwise.eta"),
    ({"strategy": "deepconf-online@4", "tau": 1.5}, "thinkwise.tau"),
    ({"strategy": "deepconf-online@4", "warmup": 4}, "thinkwise.warmup"),
    ({"strategy": "deepconf@4", "window": 0}, "thinkwise.window"),
    ({"strategy": "probe:0"}, "thinkwise.probe_every"),
    ({"strategy": "probe-majority@2", "probe_agree": 99}, "thinkwise.probe_agree"),
    ({"strategy": "first-pass@2"}, "verifier"),
    ({"strategy": "deepconf@4(eta=10"}, "thinkwise.strategy"),
])
def test_out_of_range_fields_are_openai_400s_naming_the_field(server, thinkwise, field):  # noqa: F811
    import httpx

    response = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=60,
                          json={"model": server.model, "messages": [{"role": "user", "content": "q"}],
                                "max_tokens": 4, "thinkwise": thinkwise})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and field in (error.get("param") or "") + error["message"]
