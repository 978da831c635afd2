"""Request intake: one normalisation of every prompt form, one set of refusals, whichever
entry point (Engine, LLM, strategies, server) a prompt comes through."""

from __future__ import annotations

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.errors import CapacityError, InvalidParameterError, PromptTooLongError


@pytest.fixture(scope="module")
def llm(tiny_llama):
    directory, _ = tiny_llama
    return LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=8, max_model_len=64,
               cpu_gemm_dispatch=False)


def test_every_prompt_form_gives_the_same_ids(llm):
    inputs = llm.engine.inputs
    ids = inputs.tokenize("hello world")
    assert inputs.prompt_ids("hello world") == ("hello world", ids)
    assert inputs.prompt_ids({"prompt": "hello world"}) == ("hello world", ids)
    assert inputs.prompt_ids({"prompt_token_ids": ids}) == (None, ids)
    assert inputs.prompt_ids({"prompt": "x", "prompt_token_ids": ids}) == ("x", ids)
    assert inputs.prompt_ids(ids) == (None, ids)
    assert inputs.prompt_ids(tuple(ids)) == (None, ids)
    assert inputs.prompt_ids("ignored text", prompt_token_ids=ids) == ("ignored text", ids)


@pytest.mark.parametrize("prompt, message", [
    ({"text": "hi"}, "a prompt dict needs 'prompt' or 'prompt_token_ids'"),
    (42, "prompt must be a string or a list of token ids"),
    (None, "prompt must be a string or a list of token ids"),
    (b"bytes", "prompt must be a string or a list of token ids"),
])
def test_bad_prompt_forms_are_refused(llm, prompt, message):
    with pytest.raises(InvalidParameterError, match=message):
        llm.engine.inputs.prompt_ids(prompt)
    with pytest.raises(InvalidParameterError):
        llm.engine.add_request(prompt, SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("ids, error, message", [
    ([], InvalidParameterError, "the prompt is empty"),
    ([1, -1], InvalidParameterError, "prompt token ids must be integers in"),
    ([1, 10**9], InvalidParameterError, "prompt token ids must be integers in"),
    ([1, 2.0], InvalidParameterError, "prompt token ids must be integers in"),
    (["1"], InvalidParameterError, "prompt token ids must be integers in"),
    ([5] * 64, PromptTooLongError, "the prompt has 64 tokens but the model's context holds 64"),
    ([5] * 40, CapacityError, "the prompt needs 11 KV blocks but the cache has only 8"),
])
def test_check_prompt_refusals_name_the_fix(llm, ids, error, message):
    with pytest.raises(error, match=message):
        llm.engine.check_prompt(ids)
    with pytest.raises(error, match=message):  # the same refusal from the offline API
        llm.generate([ids], SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished_requests()


def test_a_prompt_that_fits_passes(llm):
    llm.engine.check_prompt([5] * 30)  # 31 tokens with the first generated one: 8 blocks of 4


def test_chat_template_without_a_template_or_with_bad_messages(llm):
    inputs = llm.engine.inputs
    if not inputs.has_chat_template:
        with pytest.raises(InvalidParameterError, match="no chat template"):
            inputs.apply_chat_template([{"role": "user", "content": "hi"}])
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    ids = inputs.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)
    assert llm.tokenizer.decode(ids).startswith("user: hi")
    with pytest.raises(InvalidParameterError, match="'role' and 'content'"):
        inputs.apply_chat_template([{"role": "user"}], chat_template=template)
    with pytest.raises(InvalidParameterError, match="'role' and 'content'"):
        inputs.apply_chat_template(["hi"], chat_template=template)
