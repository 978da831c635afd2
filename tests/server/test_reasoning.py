"""Splitting thinking from the answer for `reasoning_content` (whole texts and streamed pieces)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkwise.server.reasoning import ReasoningSplitter, prompt_opens_thinking, split_reasoning


@pytest.mark.parametrize("text, in_thinking, expected", [
    ("plain answer", False, (None, "plain answer")),
    ("<think>six times seven</think>42", False, ("six times seven", "42")),
    ("\n<think>a</think>\n\nb", False, ("a", "\n\nb")),
    ("six times seven</think>42", True, ("six times seven", "42")),  # the template opened the block
    ("<think>cut off by max_tokens", False, ("cut off by max_tokens", "")),
    ("still thinking", True, ("still thinking", "")),
    ("<html>not thinking</html>", False, (None, "<html>not thinking</html>")),
    ("<thin", False, (None, "<thin")),  # ended while it could still have been the tag: content
    ("", False, (None, "")),
    ("x <think>late</think>", False, (None, "x <think>late</think>")),  # only a leading block is thinking
])
def test_split(text, in_thinking, expected):
    assert split_reasoning(text, in_thinking) == expected


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")
    assert not prompt_opens_thinking("<think>\n</think>\n\n")  # Qwen3 with thinking off: a closed block


TEXTS = ["<think>abc</think>answer", "plain", "<think>never closed", "a</think>b", "</think>", "<", "<think>",
         "<think>x</thi", "<think>x</think></think>y"]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TEXTS), st.booleans(), st.lists(st.integers(0, 30), max_size=6))
def test_streamed_pieces_join_to_the_whole_split(text, in_thinking, cuts):
    splitter = ReasoningSplitter(in_thinking)
    reasoning = content = ""
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    for start, end in zip(bounds, bounds[1:]):
        r, c = splitter.feed(text[start:end])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    whole_reasoning, whole_content = split_reasoning(text, in_thinking)
    assert (reasoning + r, content + c) == (whole_reasoning or "", whole_content)
    assert splitter.thought == (whole_reasoning is not None)
