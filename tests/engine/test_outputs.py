"""Python outputs of a reasoning model: reasoning_text / answer_text / reasoning_tokens on
every CompletionOutput, chat_template_kwargs through LLM.chat, the budget message, and
strategy costs split into thinking and answer tokens (tiny random Qwen3, a thinking
template written here)."""

from __future__ import annotations

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.errors import InvalidParameterError
from tests.tiny_models import make_thinking_model

MESSAGES = [{"role": "user", "content": "What is 6 * 7?"}]
CLOSE = len("</think>")  # byte-level tokenizer: one token per byte


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-qwen3-outputs")
    make_thinking_model(directory, seed=5)
    return LLM(str(directory), dtype="float32", device="cpu", num_kv_blocks=256, block_size=16,
               thinking_budget_message=" Enough.")


def test_outputs_split_thinking_from_the_answer(llm):
    assert llm.engine.reasoning_parser.name == "deepseek_r1"  # auto: the template opens the block
    output = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                               thinking_budget=4, thinking_budget_message=""))[0]
    sample = output.outputs[0]
    assert sample.text == sample.reasoning_text + "</think>" + sample.answer_text
    assert sample.reasoning_tokens == 4 + CLOSE == output.counts.reasoning_tokens
    unclosed = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert (unclosed.reasoning_text, unclosed.answer_text) == (unclosed.text, "")
    assert unclosed.reasoning_tokens == 6 and unclosed.finish_reason == "length"


def test_the_configured_budget_message_is_said_before_the_marker(llm):
    sample = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                               thinking_budget=3))[0].outputs[0]
    assert sample.reasoning_text.endswith(" Enough.") and "</think>" + sample.answer_text == \
        sample.text[len(sample.reasoning_text):]
    assert sample.reasoning_tokens == 3 + len(" Enough.") + CLOSE


def test_chat_template_kwargs_switch_thinking_off(llm):
    on = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    off = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                   chat_template_kwargs={"enable_thinking": False})[0]
    assert off.prompt_token_ids[:len(on.prompt_token_ids)] == on.prompt_token_ids
    assert len(off.prompt_token_ids) == len(on.prompt_token_ids) + len("\n</think>\n\n")
    sample = off.outputs[0]
    assert sample.reasoning_text is None and sample.answer_text == sample.text and sample.reasoning_tokens == 0
    with pytest.raises(InvalidParameterError) as error:
        llm.chat(MESSAGES, chat_template_kwargs=["enable_thinking"])
    assert error.value.param == "chat_template_kwargs"


def test_strategy_costs_split_thinking_and_answer_tokens(llm):
    answer = llm.solve(MESSAGES, "majority@3", sampling_params=SamplingParams(
        temperature=1.0, seed=2, max_tokens=20, ignore_eos=True, thinking_budget=5))
    cost = answer.cost
    assert cost.thinking_tokens == 3 * (5 + len(" Enough.") + CLOSE)
    assert cost.thinking_tokens + cost.answer_tokens == cost.decode_tokens + cost.forced_tokens
    assert cost.answer_tokens == 3  # forced tokens overshoot max_tokens: one answer token each, then "length"


def test_reasoning_effort_in_chat_uses_the_configured_budget(llm):
    llm.engine.config.reasoning_effort_budgets = {"low": 2, "medium": 5, "high": None}
    try:
        sample = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                   thinking_budget_message=""), reasoning_effort="medium")[0].outputs[0]
        assert sample.reasoning_tokens == 5 + CLOSE
        with pytest.raises(InvalidParameterError) as error:
            llm.chat(MESSAGES, reasoning_effort="maximal")
        assert error.value.param == "reasoning_effort"
    finally:
        llm.engine.config.reasoning_effort_budgets = {"low": 512, "medium": 2048, "high": 8192}
