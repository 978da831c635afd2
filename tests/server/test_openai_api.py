"""The official `openai` client against a live `thinkwise serve`: results, usage, streaming, errors."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MAX_MODEL_LEN, MAX_N, MODEL, start_server, stop_server
from thinkwise import SamplingParams
from thinkwise.server.protocol import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]


def raw_post(server, path: str, body, headers: dict | None = None, **kwargs) -> httpx.Response:
    headers = {**server.headers, **(headers or {})}
    kwargs.setdefault("timeout", 60)
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server.url}{path}", json=body, headers=headers, **kwargs)
    return httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json", **headers},
                      **kwargs)


def sse_events(response: httpx.Response) -> list:
    """The JSON payloads of a stream, checking the framing: `data: ...` events, then `data: [DONE]`."""
    text = response.text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]"
    events = []
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[len("data: "):]))
    return events


def test_binds_localhost_and_lists_models(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_greedy_matches_offline_engine_and_usage(client, offline_llm):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    ChatCompletionResponse.model_validate(response.model_dump())
    expected = offline_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=12))[0]
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    prompt_ids = offline_llm.apply_chat_template(MESSAGES)
    assert response.usage.prompt_tokens == len(prompt_ids) == expected.counts.prompt_tokens
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion" and response.model == MODEL


def test_completion_n4_counts_the_prompt_once(client, offline_llm):
    prompt = "The quick brown fox jumps over"
    response = client.completions.create(model=MODEL, prompt=prompt, n=4, max_tokens=6, temperature=0.9, seed=5,
                                         extra_body={"ignore_eos": True})
    CompletionResponse.model_validate(response.model_dump())
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.prompt_tokens == len(offline_llm.engine.tokenize(prompt))
    assert response.usage.completion_tokens == 4 * 6
    # The offline engine with the same seed draws the same four samples.
    expected = offline_llm.generate(prompt, SamplingParams(n=4, max_tokens=6, temperature=0.9, seed=5,
                                                           ignore_eos=True))[0]
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == [o.text for o in expected.outputs]


def test_chat_n4_and_max_completion_tokens(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=4, max_completion_tokens=5,
                                              extra_body={"ignore_eos": True})
    assert len(response.choices) == 4
    assert response.usage.completion_tokens == 20


def test_cached_tokens_reported_for_a_repeated_prefix(client):
    prompt = "A long shared prefix that spans several KV blocks of sixteen tokens each, " * 2
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 64
    assert second.usage.prompt_tokens_details.cached_tokens >= 64
    assert second.usage.prompt_tokens_details.cached_tokens % 16 == 0
    assert first.choices[0].text == second.choices[0].text


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0,
                                              seed=seed).choices[0].message.content

    assert sample(42) == sample(42)
    assert sample(42) != sample(43)


def _stream_chat(client, **kwargs):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kwargs)
    texts, finish, usage, ids = {}, {}, None, set()
    for chunk in stream:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts.setdefault(choice.index, "")
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    assert len(ids) == 1
    return texts, finish, usage


def test_streaming_equals_non_streaming_with_usage(client):
    kwargs = dict(max_tokens=20, temperature=0.8, seed=11, n=2)
    texts, finish, usage = _stream_chat(client, stream_options={"include_usage": True}, **kwargs)
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    assert usage is not None and usage.model_dump() == full.usage.model_dump()


def test_stream_without_usage_option_has_no_usage_chunk(server):
    response = raw_post(server, "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert all("usage" not in e for e in events)
    assert sum(1 for e in events for c in e["choices"] if c["finish_reason"]) == 1
    for event in events:
        CompletionResponse.model_validate(event)


def _pick_stop(text: str) -> str | None:
    """A 2-3 character printable substring from the middle of `text` whose first occurrence is past index 2."""
    for length in (3, 2):
        for start in range(3, len(text) - length):
            candidate = text[start:start + length]
            if candidate.isprintable() and "\ufffd" not in candidate and text.find(candidate) == start:
                return candidate
    return None


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stop_strings_cut_the_text_streamed_or_not(client, endpoint):
    def run(stop=None, stream=False):
        kwargs = dict(model=MODEL, max_tokens=60, temperature=0, stop=stop, extra_body={"ignore_eos": True})
        if endpoint == "chat":
            if not stream:
                choice = client.chat.completions.create(messages=MESSAGES, **kwargs).choices[0]
                return choice.message.content, choice.finish_reason
            text, reason = "", None
            for chunk in client.chat.completions.create(messages=MESSAGES, stream=True, **kwargs):
                for c in chunk.choices:
                    text += c.delta.content or ""
                    reason = c.finish_reason or reason
            return text, reason
        if not stream:
            choice = client.completions.create(prompt="Once upon a time", **kwargs).choices[0]
            return choice.text, choice.finish_reason
        text, reason = "", None
        for chunk in client.completions.create(prompt="Once upon a time", stream=True, **kwargs):
            for c in chunk.choices:
                text += c.text
                reason = c.finish_reason or reason
        return text, reason

    full, reason = run()
    assert reason == "length"
    stop = _pick_stop(full)
    assert stop is not None, f"no usable stop string in {full!r}"
    cut = full[: full.index(stop)]
    assert run(stop=[stop, "never-occurs-zzz"]) == (cut, "stop")
    assert run(stop=stop, stream=True) == (cut, "stop")


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True,
                                              top_logprobs=3, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-5
        assert isinstance(entry.bytes, list)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None
    streamed = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, logprobs=True,
                                              top_logprobs=1, stream=True, extra_body={"ignore_eos": True})
    entries = [e for chunk in streamed for c in chunk.choices if c.logprobs for e in (c.logprobs.content or [])]
    assert len(entries) == 6 and all(len(e.top_logprobs) == 1 for e in entries)


def test_completion_logprobs_and_echo(client):
    response = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, logprobs=2,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 5
    # Keyed by token text (OpenAI's format): ids that decode alike (lone UTF-8 pieces) share a key.
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    assert all(top[token] == value for top, token, value in
               zip(logprobs.top_logprobs, logprobs.tokens, logprobs.token_logprobs) if "\ufffd" not in token)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    echoed = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, echo=True, temperature=0)
    plain = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)
    assert echoed.choices[0].text == "hello" + plain.choices[0].text


def test_completion_batch_of_prompts_and_token_ids(client, offline_llm):
    ids = offline_llm.engine.tokenize("token ids in")
    response = client.completions.create(model=MODEL, prompt=["first", "second"], n=2, max_tokens=3,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == len(offline_llm.engine.tokenize("first")) + len(
        offline_llm.engine.tokenize("second"))
    assert response.usage.completion_tokens == 12
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="token ids in", max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=4, stream=True,
                                         extra_body={"ignore_eos": True})
    finished = [c.index for chunk in streamed for c in chunk.choices if c.finish_reason]
    assert sorted(finished) == [0, 1]


# ---------------------------------------------------------------------- errors
def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers.get("x-request-id")
    return body["error"]


def test_authentication(server):
    good = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    error = _error(httpx.post(f"{server.url}/v1/completions", json=good, timeout=30), 401)
    assert "API key" in error["message"]
    _error(raw_post(server, "/v1/completions", good, headers={"Authorization": "Bearer wrong"}), 401)
    _error(httpx.get(f"{server.url}/v1/models", timeout=30), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{server.url}/metrics").status_code == 200


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": MODEL, "prompt": "x", "max_tokens": "4"}, "max_tokens", "integer"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens", "greater"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature", "greater"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", "greater"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n", "greater"),
    ({"model": MODEL, "prompt": "x", "n": MAX_N + 1}, "n", "at most"),
    ({"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens", "context"),
    ({"model": MODEL, "prompt": "x", "stop": ""}, "stop", ""),
    ({"model": MODEL, "prompt": "x", "unknown_field": 1}, "unknown_field", "unrecognized"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"model": MODEL, "prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"model": MODEL, "prompt": "x", "logit_bias": {"1": 2.0}}, "logit_bias", "not supported"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, None, "stream"),
    ({"model": MODEL, "prompt": [10**9]}, "prompt", "token ids"),
    ({"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ({"model": MODEL, "prompt": ["fine", "y" * 400]}, "prompt", "shorten the prompt"),
    ({"model": MODEL}, "prompt", "required"),
    ({"model": MODEL, "prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens", "max_tokens"),
    ({"prompt": "x"}, "model", "required"),
])
def test_bad_completion_requests_get_400(server, body, param, words):
    error = _error(raw_post(server, "/v1/completions", body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


def test_bad_chat_requests_get_400(server):
    base = {"model": MODEL, "messages": MESSAGES}
    for body, param in [
        ({**base, "messages": []}, "messages"),
        ({**base, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({**base, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content"),
        ({**base, "top_logprobs": 2}, None),
        ({**base, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({**base, "max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({**base, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({**base, "seed": 2**70}, "seed"),
    ]:
        assert _error(raw_post(server, "/v1/chat/completions", body), 400)["param"] == param, body


def test_malformed_bodies_get_400(server):
    for raw in [b"{not json", b"", b"[1, 2]", b'"just a string"', b"\xff\xfe", b'{"model": NaN}']:
        error = _error(raw_post(server, "/v1/chat/completions", raw), 400)
        assert error["type"] == "invalid_request_error"


def test_unknown_model_is_404(server, client):
    error = _error(raw_post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_prompt_too_long_is_400_with_the_engine_message(server, client):
    error = _error(raw_post(server, "/v1/completions", {"model": MODEL, "prompt": "y" * 400}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "shorten the prompt" in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "z" * 400}])


def test_oversized_body_is_413_and_unknown_route_404(server):
    error = _error(raw_post(server, "/v1/completions", b'{"model": "tiny", "prompt": "' + b"a" * (9 << 20) + b'"}'),
                   413)
    assert "limit" in error["message"]
    _error(httpx.get(f"{server.url}/v1/nope", headers=server.headers, timeout=30), 404)
    _error(httpx.get(f"{server.url}/v1/completions", headers=server.headers, timeout=30), 405)


def test_server_keeps_serving_after_bad_requests(server, client):
    for _ in range(3):
        raw_post(server, "/v1/completions", b"{")
        raw_post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "n": 99})
    response = client.completions.create(model=MODEL, prompt="still alive?", max_tokens=3)
    assert response.choices[0].finish_reason in ("stop", "length")
    health = server.wait_idle()
    assert health["status"] == "ok" and health["engine"]["kv_blocks_used"] == 0


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "stream then hang up", "max_tokens": 200, "n": 3, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers) as response:
            assert response.status_code == 200
            stream = response.iter_raw()
            for _ in range(3):
                next(stream)
            in_flight = server.health()
            assert in_flight["requests_in_flight"] == 1 and in_flight["engine"]["kv_blocks_used"] > 0
            before = disconnects(server)
            # Leaving the block closes the connection mid-stream.
    health = server.wait_idle(timeout=5)
    assert health["engine"]["kv_blocks_used"] == 0 and health["engine"]["running_sequences"] == 0
    assert health["requests_in_flight"] == 0 and health["sequences_in_flight"] == 0
    assert disconnects(server) == before + 1


def disconnects(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "thinkwise_client_disconnects_total")


def test_disconnect_during_non_streamed_request_aborts(server):
    before = disconnects(server)
    body = {"model": MODEL, "prompt": "wait for me", "max_tokens": 240, "n": 8, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        raw_post(server, "/v1/completions", body, timeout=0.05)  # 8 x 240 tokens take ~0.4 s
    health = server.wait_idle(timeout=5)
    assert health["engine"]["kv_blocks_used"] == 0 and health["requests_in_flight"] == 0
    assert disconnects(server) == before + 1


def test_queue_full_is_429_and_clears(tiny_llama, tmp_path):
    directory, _ = tiny_llama
    small = start_server(directory, tmp_path / "small.log", "--max-num-seqs", "2", "--max-queue", "1",
                         "--kv-blocks", "256", api_key=None)
    try:
        body = {"model": MODEL, "prompt": "occupy", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{small.url}/v1/completions", json={**body, "n": 2}) as first, \
                    http.stream("POST", f"{small.url}/v1/completions", json=body) as second:
                assert first.status_code == second.status_code == 200
                refused = http.post(f"{small.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
                error = _error(refused, 429)
                assert error["code"] == "queue_full" and refused.headers.get("retry-after")
                # No key was configured on this server: /v1 is open.
                assert http.get(f"{small.url}/v1/models").status_code == 200
        small.wait_idle(timeout=5)
        ok = httpx.post(f"{small.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200, ok.text
    finally:
        assert stop_server(small.process) == 0, small.log()[-3000:]
