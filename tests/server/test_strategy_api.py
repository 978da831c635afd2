"""Strategies through chat completions: extra_body, the model-name prefix, errors, usage."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import MODEL
from tests.server.test_openai_api import disconnects
from thinkwise.tasks.extraction import answers_equal

MESSAGES = [{"role": "user", "content": "count: 1 2 3"}]


def strategy_request(client, model=MODEL, **thinkwise):
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=4,
                                          extra_body={"thinkwise": thinkwise} if thinkwise else None)


def test_extra_body_short_m_at_k(client, server):
    response = strategy_request(client, strategy="short-m@k", k=4, m=2)
    extra = response.model_extra["thinkwise"]
    assert extra["strategy"] == "short-2@4" and len(extra["samples"]) == 4
    cost = extra["cost"]
    # usage counts every token the strategy computed, aborted samples included.
    assert response.usage.completion_tokens == cost["decode_tokens"] + cost["forced_tokens"]
    assert cost["decode_tokens"] == sum(s["num_tokens"] for s in extra["samples"])
    assert response.usage.prompt_tokens == cost["prompt_tokens"] > 0
    chosen = response.choices[0].message.content
    # short-2@4 votes among (at most) the first two samples that finished with an answer; with
    # no vote there is no answer and no text, otherwise the text is a voter's.
    voters = [s for s in extra["samples"] if s["finish_reason"] == "stop" and s["answer"] is not None]
    if extra["votes"]:
        assert 0 < sum(extra["votes"].values()) <= 2
        assert chosen in [s["text"] for s in voters]
        assert extra["answer"] in extra["votes"]
    else:
        assert not voters and not chosen and extra["answer"] is None
    server.wait_idle()


def test_model_prefix_forms(client):
    for prefix, name, count in (("short-m@k-4-2", "short-2@4", 4), ("majority@3", "majority@3", 3),
                                ("adaptive:4", "adaptive", None), ("budget:6", "budget:6", 1)):
        response = client.chat.completions.create(model=f"{prefix}/{MODEL}", messages=MESSAGES, max_tokens=8,
                                                  temperature=1.0, seed=1)
        extra = response.model_extra["thinkwise"]
        assert extra["strategy"].startswith(name.split(":")[0]) and extra["served_model"] == MODEL
        if count:
            assert len(extra["samples"]) == count


def test_tokens_reported_equal_the_engines_counts(client, offline_llm):
    response = strategy_request(client, strategy="majority@3")
    extra = response.model_extra["thinkwise"]
    # Recompute the same samples offline: the same seed gives the same tokens on the same model.
    from thinkwise import SamplingParams

    prompt = offline_llm.apply_chat_template(MESSAGES)
    offline = offline_llm.generate({"prompt_token_ids": prompt},
                                   SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=4))[0]
    assert [s["num_tokens"] for s in extra["samples"]] == [len(o.token_ids) for o in offline.outputs]
    assert extra["cost"]["decode_tokens"] == offline.counts.generated_tokens
    assert response.usage.prompt_tokens == len(prompt)


@pytest.mark.parametrize("thinkwise,match", [
    ({"strategy": "nonsense"}, "unknown strategy"),
    ({"strategy": "short-m@k", "k": 4}, "needs m"),
    ({"strategy": "short-m@k", "k": 2, "m": 5}, "m <= k"),
    ({"strategy": "majority@64"}, "at most"),
    ({"strategy": "best-of-2"}, "verifier"),
    ({"strategy": "majority@2", "bogus": 1}, "bogus"),
    ({"strategy": "majority@k", "k": 0}, "thinkwise.k"),
    ({"strategy": "majority@2", "extract": "telepathy"}, "thinkwise.extract"),
    ({"strategy": "majority@2", "k": "2"}, "thinkwise.k"),
    ({"k": 2}, "needs a strategy"),
])
def test_bad_strategy_parameters_are_400(server, thinkwise, match):
    response = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=60,
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "thinkwise": thinkwise})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert match in error["message"] and error["type"] == "invalid_request_error"


def test_prefix_with_options_and_conflicting_strategies(client):
    # The object adds options to the prefix's strategy: an exact checker for best-of-n.
    response = client.chat.completions.create(model=f"best-of-3/{MODEL}", messages=MESSAGES, max_tokens=6,
                                              temperature=1.0, seed=2, extra_body={"thinkwise": {"answer": "7"}})
    extra = response.model_extra["thinkwise"]
    assert extra["strategy"] == "best-of-3" and extra["cost_basis"] == "engine"
    assert all(s["score"] == float(answers_equal(s["answer"], "7")) for s in extra["samples"])
    with pytest.raises(openai.BadRequestError, match="name it once"):
        client.chat.completions.create(model=f"majority@3/{MODEL}", messages=MESSAGES, max_tokens=4,
                                       extra_body={"thinkwise": {"strategy": "short-1@3"}})


def test_streaming_with_a_strategy_streams(client):
    """(Refused before issue 14; now live: tests/server/test_strategy_stream.py has the details.)"""
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True,
                                                 extra_body={"thinkwise": {"strategy": "majority@2"}}))
    assert chunks[-1].model_extra["thinkwise"]["event"] == "done" and chunks[-1].choices[0].finish_reason == "stop"


def test_unknown_model_behind_a_prefix_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="majority@2/nope", messages=MESSAGES, max_tokens=4)


def test_client_disconnect_aborts_every_sample(server):
    before = disconnects(server)
    # 8 samples x 200 tokens take the tiny CPU model ~0.35 s; the client gives up after 0.05 s
    # (0.2 s was no longer always short enough once CPU decode got faster).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=0.05,
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True,
                         "thinkwise": {"strategy": "majority@8"}})
    health = server.wait_idle(timeout=30)
    assert disconnects(server) == before + 1
    assert health["engine"]["kv_blocks_used"] == 0 and health["engine"]["running_sequences"] == 0
