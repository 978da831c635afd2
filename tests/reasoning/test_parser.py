"""Reasoning parsers per family: whole and streamed splits (markers cut anywhere), unclosed
blocks, template-opened blocks, thinking switched off, `auto` from a template, token counts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinkwise.errors import InvalidParameterError
from thinkwise.reasoning import ReasoningParser, answer_part, get_parser, resolve_parser
from tests.tiny_models import byte_tokenizer

R1, QWEN3, NONE = ReasoningParser("deepseek_r1"), ReasoningParser("qwen3"), ReasoningParser("none")
OPEN_TAIL = "<|im_start|>assistant\n<think>\n"
PLAIN_TAIL = "<|im_start|>assistant\n"
OFF_TAIL = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3 / DeepSeek-V3.1 with thinking off


@pytest.mark.parametrize("parser, text, tail, expected", [
    # deepseek_r1: the template opened the block, the output holds only its end.
    (R1, "six times seven</think>42", PLAIN_TAIL, ("six times seven", "42", True)),
    (R1, "<think>repeated opener</think>42", OPEN_TAIL, ("repeated opener", "42", True)),
    (R1, "cut off by max_tokens", OPEN_TAIL, ("cut off by max_tokens", "", False)),
    (R1, "answer at once", OFF_TAIL, (None, "answer at once", True)),
    # qwen3: the block is in the output, or absent when thinking is off.
    (QWEN3, "<think>a</think>\n\nb", PLAIN_TAIL, ("a", "\n\nb", True)),
    (QWEN3, "just the answer", OFF_TAIL, (None, "just the answer", True)),
    (QWEN3, "<think>never closed", PLAIN_TAIL, ("never closed", "", False)),
    (QWEN3, "inside</think>out", OPEN_TAIL, ("inside", "out", True)),  # a newer template opens it
    (QWEN3, "x <think>late</think>", PLAIN_TAIL, (None, "x <think>late</think>", True)),
    (NONE, "<think>a</think>b", OPEN_TAIL, (None, "<think>a</think>b", True)),
])
def test_whole_split(parser, text, tail, expected):
    assert parser.split(text, tail) == expected


TEXTS = ["<think>abc</think>answer", "plain", "<think>never closed", "a</think>b", "</think>", "<", "<think>",
         "<think>x</thi", "<think>x</think></think>y", " <thi", "abc</th"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TEXTS), st.sampled_from([R1, QWEN3]), st.sampled_from([OPEN_TAIL, PLAIN_TAIL, OFF_TAIL]),
       st.lists(st.integers(0, 30), max_size=8))
def test_streamed_pieces_join_to_the_whole_split_wherever_the_marker_is_cut(text, parser, tail, cuts):
    splitter = parser.splitter(tail)
    reasoning = content = ""
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    for start, end in zip(bounds, bounds[1:]):
        r, c = splitter.feed(text[start:end])
        assert "</think>" not in r  # the closing marker never leaks into the reasoning
        reasoning, content = reasoning + r, content + c
    r, c = splitter.flush()
    whole_reasoning, whole_content, closed = parser.split(text, tail)
    assert (reasoning + r, content + c) == (whole_reasoning or "", whole_content)
    assert splitter.closed == closed


def test_a_marker_split_one_character_per_delta():
    splitter = R1.splitter(OPEN_TAIL)
    pieces = [splitter.feed(ch) for ch in "think</think>ans"]
    assert "".join(r for r, _ in pieces) == "think" and "".join(c for _, c in pieces) == "ans"
    assert pieces[5] == ("", "")  # "<" held back: it may start the marker


@pytest.mark.parametrize("text, expected", [
    ("<think>7 * 6 = 42? no, 41</think>The answer is 43", "The answer is 43"),
    ("reasoning 41</think>43", "43"),
    ("<think>41 and still thinking", ""),
    ("no thinking at all: 43", "no thinking at all: 43"),
])
def test_answer_part(text, expected):
    assert answer_part(text) == expected


def test_answer_extraction_reads_the_answer_part_only():
    from thinkwise.tasks.extraction import extract_answer

    assert extract_answer("<think>maybe 41, maybe 12</think>So 43.") == "43"
    assert extract_answer("<think>Answer: 41") is None  # the block never closed: no answer yet


def test_unknown_parser_names_are_refused():
    with pytest.raises(InvalidParameterError) as error:
        get_parser("deepseek")
    assert error.value.param == "reasoning_parser" and "qwen3" in error.value.message
    with pytest.raises(InvalidParameterError):
        resolve_parser("auto ", None)


QWEN3_STYLE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
               "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
R1_STYLE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<think>\n{% endif %}"


def test_auto_reads_the_family_from_the_template_and_tokenizer():
    tokenizer = byte_tokenizer()
    assert resolve_parser("auto", QWEN3_STYLE, tokenizer).name == "qwen3"
    assert resolve_parser("auto", R1_STYLE, tokenizer).name == "deepseek_r1"
    assert resolve_parser("auto", tokenizer.chat_template, tokenizer).name == "none"  # plain ChatML
    assert resolve_parser("auto", "{{ raise_exception('no') }}<think>", tokenizer).name == "qwen3"
    tokenizer.add_tokens(["<think>", "</think>"])
    assert resolve_parser("auto", None, tokenizer).name == "qwen3"  # no template mention, but the tokens exist
    assert resolve_parser("none", R1_STYLE, tokenizer).name == "none"  # an explicit choice wins


def test_reasoning_token_counts():
    tokenizer = byte_tokenizer()
    decode = tokenizer.decode
    ids = tokenizer.encode("abc</think>de", add_special_tokens=False)
    close = tokenizer.encode("</think>", add_special_tokens=False)
    assert R1.reasoning_token_count(ids, "abc</think>de", OPEN_TAIL, decode, close) == 3 + 8
    # Without the marker's ids (merged into other tokens), the shortest closing prefix is found.
    assert R1.reasoning_token_count(ids, "abc</think>de", OPEN_TAIL, decode, None) == 3 + 8
    assert R1.reasoning_token_count(ids[:5], "abc</", OPEN_TAIL, decode, close) == 5  # never closed: all
    assert QWEN3.reasoning_token_count(ids, "abc</think>de", PLAIN_TAIL, decode, close) == 0  # no block
    # A Qwen3-like vocabulary with the markers as single tokens.
    tokenizer.add_tokens(["<think>", "</think>"])
    ids = tokenizer.encode("<think>xy</think>z", add_special_tokens=False)
    close = tokenizer.encode("</think>", add_special_tokens=False)
    assert len(close) == 1 and QWEN3.reasoning_token_count(ids, "<think>xy</think>z", PLAIN_TAIL, decode, close) == 4
