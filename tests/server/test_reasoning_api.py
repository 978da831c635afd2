"""The thinking API over HTTP on a tiny random Qwen3 whose chat template (written here)
opens a <think> block, or closes an empty one with enable_thinking=false: reasoning_content
and content (whole and streamed, read by the openai client), reasoning_tokens in usage,
thinking budgets (thinking_token_budget, reasoning_effort, a budget message), per-request
parsers, penalties, and a 400 naming the field for every bad value, the server staying up."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import start_server, stop_server

MESSAGES = [{"role": "user", "content": "What is 6 * 7?"}]
CLOSE_TOKENS = len("</think>")  # the byte-level test tokenizer: one token per byte


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    from tests.tiny_models import make_thinking_model

    directory = tmp_path_factory.mktemp("tiny-qwen3-thinking")
    make_thinking_model(directory, seed=3)
    srv = start_server(directory, directory / "serve.log", "--reasoning-effort-budgets", "low=3,medium=6,high=none",
                       "--max-num-seqs", "16")
    yield srv
    assert stop_server(srv.process) == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def client(thinking):
    with openai.OpenAI(base_url=f"{thinking.url}/v1", api_key=thinking.api_key, max_retries=0, timeout=60) as c:
        yield c


def chat(client, **kwargs):
    body = dict(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in (
        "chat_template_kwargs", "thinking_token_budget", "thinking_budget_message", "reasoning_parser",
        "repetition_penalty", "ignore_eos")}
    body.update(kwargs)
    return client.chat.completions.create(**body, extra_body=extra or None)


def streamed(client, **kwargs):
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in ("chat_template_kwargs", "thinking_token_budget",
                                                             "thinking_budget_message", "ignore_eos")}
    body = dict(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    body.update(kwargs)
    stream = client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True},
                                            extra_body=extra or None)
    reasoning = content = ""
    usage = finish = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return reasoning, content, finish, usage


def test_a_budget_closes_the_block_and_splits_reasoning_from_content(client, thinking):
    response = chat(client, thinking_token_budget=5, ignore_eos=True)
    message, usage = response.choices[0].message, response.usage
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and "</think>" not in reasoning and "</think>" not in message.content
    assert usage.completion_tokens == 24
    # Five thought tokens plus the forced marker: the engine's own count, not a guess from text.
    assert usage.completion_tokens_details.reasoning_tokens == 5 + CLOSE_TOKENS
    assert (reasoning, message.content, "length") == streamed(client, thinking_token_budget=5, ignore_eos=True)[:3]
    assert streamed(client, thinking_token_budget=5, ignore_eos=True)[3].completion_tokens_details.reasoning_tokens \
        == 5 + CLOSE_TOKENS
    thinking.wait_idle()


def test_the_budget_message_is_said_before_the_marker(client):
    message = chat(client, thinking_token_budget=4, thinking_budget_message=" Time is up.", ignore_eos=True)
    reasoning = message.choices[0].message.model_extra["reasoning_content"]
    assert reasoning.endswith(" Time is up.")
    assert message.usage.completion_tokens_details.reasoning_tokens == 4 + len(" Time is up.") + CLOSE_TOKENS


def test_reasoning_effort_maps_to_the_configured_budgets(client):
    low = chat(client, reasoning_effort="low", ignore_eos=True)
    medium = chat(client, reasoning_effort="medium", ignore_eos=True)
    assert low.usage.completion_tokens_details.reasoning_tokens == 3 + CLOSE_TOKENS
    assert medium.usage.completion_tokens_details.reasoning_tokens == 6 + CLOSE_TOKENS
    high = chat(client, reasoning_effort="high", ignore_eos=True)  # unlimited: random bytes never close it
    assert high.choices[0].message.content == "" and high.choices[0].finish_reason == "length"
    assert high.usage.completion_tokens_details.reasoning_tokens == high.usage.completion_tokens == 24


def test_an_unclosed_block_is_all_reasoning_and_finish_reason_says_why(client):
    response = chat(client, max_tokens=10, ignore_eos=True)
    choice = response.choices[0]
    assert choice.message.content == "" and len(choice.message.model_extra["reasoning_content"]) > 0
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens_details.reasoning_tokens == 10
    reasoning, content, finish, usage = streamed(client, max_tokens=10, ignore_eos=True)
    assert (reasoning, content, finish) == (choice.message.model_extra["reasoning_content"], "", "length")


def test_thinking_switched_off_by_chat_template_kwargs(client):
    response = chat(client, chat_template_kwargs={"enable_thinking": False}, max_tokens=10, ignore_eos=True)
    message = response.choices[0].message
    assert message.model_extra.get("reasoning_content") is None and len(message.content) > 0
    assert response.usage.completion_tokens_details.reasoning_tokens == 0
    # The template really saw the variable: the prompt is longer by the closed empty block.
    on = chat(client, max_tokens=1)
    assert response.usage.prompt_tokens == on.usage.prompt_tokens + len("\n</think>\n\n")
    reasoning, content, _, _ = streamed(client, chat_template_kwargs={"enable_thinking": False}, max_tokens=10,
                                        ignore_eos=True)
    assert (reasoning, content) == ("", message.content)


def test_a_request_may_choose_its_parser(client):
    response = chat(client, reasoning_parser="none", thinking_token_budget=3, ignore_eos=True)
    message = response.choices[0].message
    assert message.model_extra.get("reasoning_content") is None and "</think>" in message.content
    assert response.usage.completion_tokens_details.reasoning_tokens == 0


def test_penalties_are_accepted_and_change_the_output(thinking):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 30, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "reasoning_parser": "none"}

    def token_bytes(extra):
        response = httpx.post(f"{thinking.url}/v1/chat/completions", json={**body, **extra}, headers=thinking.headers,
                              timeout=60)
        assert response.status_code == 200, response.text
        return [tuple(entry["bytes"]) for entry in response.json()["choices"][0]["logprobs"]["content"]]

    plain, penalized = token_bytes({}), token_bytes({"presence_penalty": 2.0})
    assert len(penalized) == len(set(penalized)) == 30  # presence 2 beats a random model's logit spread
    assert len(set(plain)) < 30
    assert token_bytes({"repetition_penalty": 1.0, "frequency_penalty": 0}) == plain  # neutral values


BAD = [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"thinking_token_budget": -1}, "thinking_token_budget"),
    ({"thinking_token_budget": 0}, "thinking_token_budget"),
    ({"thinking_token_budget": "5"}, "thinking_token_budget"),
    ({"thinking_token_budget": 4, "reasoning_effort": "low"}, "reasoning_effort"),
    ({"reasoning_parser": "deepseek"}, "reasoning_parser"),
    ({"thinking_budget_message": "x" * 2000}, "thinking_budget_message"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": "enable_thinking=false"}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"{{ x }}": 1}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {f"k{i}": i for i in range(100)}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"blob": "x" * 100_000}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"deep": [[[[[[1]]]]]]}}, "chat_template_kwargs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
]


@pytest.mark.parametrize("fields, param", BAD)
def test_bad_reasoning_fields_get_a_400_naming_the_field(thinking, fields, param):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **fields}
    response = httpx.post(f"{thinking.url}/v1/chat/completions", json=body, headers=thinking.headers, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].split(".")[0] == param, error
    assert thinking.health()["status"] == "ok"


def stream_strategy(client, strategy):
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=20, temperature=1.0, seed=3, stream=True,
        stream_options={"include_usage": True},
        extra_body={"thinkwise": {"strategy": strategy}, "thinking_token_budget": 3, "ignore_eos": True})
    phases, reasoning, content, usage, done = [], "", "", None, None
    for chunk in stream:
        event = (chunk.model_extra or {}).get("thinkwise")
        if event and event["event"] == "progress":
            phases.append([s["phase"] for s in event["samples"]])
        if event and event["event"] == "done":
            done = event
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    return phases, reasoning, content, usage, done


def test_a_streamed_strategy_on_a_thinking_model(client):
    phases, _, _, usage, done = stream_strategy(client, "majority@2")
    assert phases[-1] == ["answering", "answering"]  # (the phase rule itself: test_strategy_stream.py)
    assert usage.completion_tokens_details.reasoning_tokens == done["cost"]["thinking_tokens"] == 2 * (3 + CLOSE_TOKENS)
    # greedy keeps its sample's text whatever its answer: it arrives split into thinking and answer.
    phases, reasoning, content, usage, done = stream_strategy(client, "greedy")
    assert done["samples"][0]["text"] == reasoning + "</think>" + content and reasoning and content
    assert usage.completion_tokens_details.reasoning_tokens == 3 + CLOSE_TOKENS
