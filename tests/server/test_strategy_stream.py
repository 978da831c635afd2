"""Live strategy streams read by the official openai client: started, progress (tokens, finish
and abort reasons, the running tally), decided, the chosen text, the cost; a client that
leaves mid-stream frees every sample."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import MODEL

MESSAGES = [{"role": "user", "content": "count: 1 2 3"}]


def stream_events(client, include_usage=False, **thinkwise):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=4, stream=True,
        stream_options={"include_usage": True} if include_usage else None, extra_body={"thinkwise": thinkwise})
    events, content, finish, usage, order = [], "", None, None, []
    for chunk in stream:  # the openai client parses every chunk as a ChatCompletionChunk
        assert chunk.object == "chat.completion.chunk"
        extra = (chunk.model_extra or {}).get("thinkwise")
        if extra is not None:
            events.append(extra)
            order.append(extra["event"])
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                content += choice.delta.content
                order.append("text")
            finish = choice.finish_reason or finish
    return events, content, finish, usage, order


def test_a_streamed_strategy_reports_progress_then_the_decision_then_the_answer(client, server):
    events, content, finish, usage, order = stream_events(client, include_usage=True, strategy="majority@3")
    assert order[0] == "started" and events[0]["samples"] == 3 and events[0]["strategy"]["kind"] == "majority"
    assert "progress" in order and order.index("decided") > max(i for i, e in enumerate(order) if e == "progress")
    assert all(e != "text" for e in order[:order.index("decided")]), "text must follow the decision"
    assert order[-1] == "done" and finish == "stop"
    progress = [e for e in events if e["event"] == "progress"]
    for before, after in zip(progress, progress[1:]):  # tokens only grow, a finished sample stays finished
        for a, b in zip(before["samples"], after["samples"]):
            assert b["tokens"] >= a["tokens"] and (b["finished"] or not a["finished"])
    assert any(not s["finished"] for s in progress[0]["samples"]), "progress must be live, not only a summary"
    last, done, decided = progress[-1], events[-1], next(e for e in events if e["event"] == "decided")
    assert all(s["finished"] for s in last["samples"]) and len(last["samples"]) == 3
    assert [s["tokens"] for s in last["samples"]] == [s["num_tokens"] for s in done["samples"]]
    assert decided["votes"] == done["votes"] and decided["answer"] == done["answer"]
    assert usage.completion_tokens == done["cost"]["decode_tokens"] + done["cost"]["forced_tokens"]
    assert usage.completion_tokens_details.reasoning_tokens == done["cost"]["thinking_tokens"] == 0
    assert done["cost"]["answer_tokens"] == usage.completion_tokens
    # The same request unstreamed (same seed, same samples) chooses the same text at the same cost.
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, seed=4,
                                           extra_body={"thinkwise": {"strategy": "majority@3"}})
    assert whole.choices[0].message.content == content
    assert whole.model_extra["thinkwise"]["cost"]["decode_tokens"] == done["cost"]["decode_tokens"]
    server.wait_idle()


def test_aborted_samples_say_why(client, server):
    # Many one-letter stop strings end samples early, so short-1@4 aborts the rest once one ends.
    stops = list("etaoinshrdlucmfw")
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=40, temperature=1.0, seed=11, stream=True, stop=stops,
        extra_body={"thinkwise": {"strategy": "short-1@4"}})
    events = [c.model_extra["thinkwise"] for c in stream if (c.model_extra or {}).get("thinkwise")]
    done = events[-1]
    last = [e for e in events if e["event"] == "progress"][-1]
    for live, final in zip(last["samples"], done["samples"]):
        assert live["aborted"] == (final["abort_reason"] is not None)
        if live["aborted"]:
            assert live["abort_reason"] and live["finish_reason"] == "abort"
    assert done["cost"]["aborted_samples"] == sum(s["aborted"] for s in last["samples"]) > 0
    server.wait_idle()


def test_a_client_that_leaves_mid_stream_frees_every_sample(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "temperature": 1.0, "ignore_eos": True,
            "stream": True, "thinkwise": {"strategy": "majority@4"}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers,
                      timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("thinkwise", {}).get("event") == "progress":
                break  # leave while the samples run
    health = server.wait_idle()
    engine = health["engine"]
    assert engine["running_sequences"] == 0 and engine["kv_blocks_used"] == 0 and health["requests_in_flight"] == 0


@pytest.mark.parametrize("extra, param", [({"n": 2}, "n"), ({"thinkwise": {"strategy": "wizard@3"}}, "thinkwise.strategy")])
def test_bad_streamed_strategy_requests_get_400_before_any_event(server, extra, param):
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "thinkwise": {"strategy": "majority@2"}, **extra}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_a_strategy_that_refuses_its_input_is_a_400_even_when_streamed(client, server):
    import openai

    with pytest.raises(openai.BadRequestError, match="verifier"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True,
                                       extra_body={"thinkwise": {"strategy": "best-of-4"}})
    assert server.wait_idle()["requests_in_flight"] == 0


def test_the_tally_reports_each_samples_phase_answer_and_abort():
    from types import SimpleNamespace

    from thinkwise.reasoning import ReasoningParser
    from thinkwise.server.strategy_stream import LiveTally
    from thinkwise.tasks.extraction import extract_answer

    group = SimpleNamespace(k=4, texts=["still thinking 41", "done thinking</think>The answer is 42",
                                        "x</think>42", "thinking, then cut"],
                            num_tokens=[5, 9, 4, 3], finish_reasons=[None, "stop", "stop", "abort"],
                            abort_reasons=[None, None, None, "decided"])
    tally = LiveTally(extract_answer, ReasoningParser("deepseek_r1"), "<think>\n")
    tally.groups.append(group)
    rows = tally.samples()
    assert [r["phase"] for r in rows] == ["thinking", "answering", "answering", "thinking"]
    assert [r["answer"] for r in rows] == [None, "42", "42", None]  # only finished samples vote, answer part only
    assert [(r["aborted"], r["abort_reason"]) for r in rows] == [(False, None), (False, None), (False, None),
                                                                (True, "decided")]
    assert LiveTally.votes(rows) == {"42": 2}
    plain = LiveTally(extract_answer, ReasoningParser("none"))
    plain.groups.append(group)
    assert {r["phase"] for r in plain.samples()} == {"answering"}
