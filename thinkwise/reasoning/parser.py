"""Reasoning parsers: a reasoning model's thinking span split from its answer, whole or streamed.

Reasoning models write their thinking between `<think>` and `</think>`, then the answer.
Families differ in who opens the block: DeepSeek-R1 distills (`deepseek_r1`) have a chat
template that ends the prompt with `<think>`, so the output holds only `…</think>answer`;
Qwen3/QwQ (`qwen3`) write `<think>…</think>` in the output, or nothing at all when thinking
is disabled (`enable_thinking=False` closes an empty block in the prompt), and newer Qwen
templates open the block in the prompt too, which the prompt's tail tells (a prompt that
ends with a closed block, as DeepSeek-V3.1's non-thinking mode, starts the answer at once); `none` keeps all
text as the answer. `auto` picks one from the chat template and the tokenizer. A sample
that never closes its block is all reasoning with an empty answer (its finish_reason,
usually "length", says why). `ReasoningSplitter` splits incrementally for streams: it
holds back only the few characters that could still become a marker, so a marker split
across deltas or tokens is found and the streamed pieces join to exactly the whole split.
`answer_part(text)` is the answer of a finished text whatever the family, for answer
extraction and votes. This module is plain text processing with no engine imports, so
tasks/, engine/ and server/ may all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from thinkwise.errors import InvalidParameterError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PARSER_NAMES = ("auto", "deepseek_r1", "qwen3", "none")
# How many of a prompt's last tokens are decoded to see whether the template opened (or
# closed) a thinking block: enough for a marker spelled byte by byte plus blank lines.
PROMPT_TAIL_TOKENS = 32


def prompt_opens_thinking(prompt_tail: str, open_marker: str = THINK_OPEN) -> bool:
    """Whether a rendered prompt (its last characters) leaves the model inside a thinking block."""
    return prompt_tail.rstrip().endswith(open_marker)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (held back: it may grow into the tag)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningSplitter:
    """One sample's text, fed in pieces, split into (reasoning, content) pieces.

    States: "start" (not yet known whether the output opens a block), "think_start" (inside
    a block the prompt opened; a repeated opening marker is dropped), "think", "content".
    """

    def __init__(self, in_thinking: bool = False, open_marker: str = THINK_OPEN, close_marker: str = THINK_CLOSE):
        self.state = "think_start" if in_thinking else "start"
        self.thought = in_thinking  # the sample has a thinking block (reasoning_content is sent)
        self.open_marker, self.close_marker = open_marker, close_marker
        self.buffer = ""

    @property
    def closed(self) -> bool:
        """The thinking block was closed (or there never was one)."""
        return self.state == "content"

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning = content = ""
        while True:
            if self.state in ("start", "think_start"):
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.open_marker):
                    self.buffer, self.state, self.thought = stripped[len(self.open_marker):], "think", True
                    continue
                if self.open_marker.startswith(stripped):  # "", "<", "<th", ...: cannot tell yet
                    return reasoning, content
                self.state = "think" if self.state == "think_start" else "content"
            if self.state == "think":
                end = self.buffer.find(self.close_marker)
                if end >= 0:
                    reasoning += self.buffer[:end]
                    self.buffer, self.state = self.buffer[end + len(self.close_marker):], "content"
                    continue
                keep = _partial_tag(self.buffer, self.close_marker)
                reasoning += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return reasoning, content
            content += self.buffer
            self.buffer = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        """The text held back, once the sample has ended."""
        held, self.buffer = self.buffer, ""
        return (held, "") if self.state in ("think", "think_start") else ("", held)


def split_reasoning(text: str, in_thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a whole sample; reasoning is None when it has no thinking block."""
    splitter = ReasoningSplitter(in_thinking)
    reasoning, content = splitter.feed(text)
    held_reasoning, held_content = splitter.flush()
    return (reasoning + held_reasoning if splitter.thought else None), content + held_content


def answer_part(text: str) -> str:
    """The answer of a finished sample, whatever its family: the text after the first closing
    marker (a block opened by the prompt or by the output), "" when a leading block never
    closes, else the whole text. What answer extraction and votes read."""
    if THINK_CLOSE in text and not text.lstrip().startswith(THINK_OPEN):
        return split_reasoning(text, in_thinking=True)[1]
    return split_reasoning(text, in_thinking=False)[1]


@dataclass(frozen=True)
class ReasoningParser:
    """How one model family marks its thinking (see the module doc)."""

    name: str  # "deepseek_r1", "qwen3" or "none"
    open_marker: str = THINK_OPEN
    close_marker: str = THINK_CLOSE

    def in_thinking(self, prompt_tail: str) -> bool:
        """Whether a sample of this prompt starts inside a thinking block."""
        if self.name == "none":
            return False
        if self.name == "deepseek_r1":  # unless the prompt closed the block itself (thinking switched off)
            return not prompt_tail.rstrip().endswith(self.close_marker)
        return prompt_opens_thinking(prompt_tail, self.open_marker)

    def splitter(self, prompt_tail: str) -> ReasoningSplitter | None:
        """An incremental splitter for one sample; None when this family has no thinking."""
        if self.name == "none":
            return None
        return ReasoningSplitter(self.in_thinking(prompt_tail), self.open_marker, self.close_marker)

    def split(self, text: str, prompt_tail: str = "") -> tuple[str | None, str, bool]:
        """(reasoning or None, content, closed) of a whole sample; closed is False when the
        thinking block never ended."""
        splitter = self.splitter(prompt_tail)
        if splitter is None:
            return None, text, True
        reasoning, content = splitter.feed(text)
        held_reasoning, held_content = splitter.flush()
        closed = splitter.closed
        return (reasoning + held_reasoning if splitter.thought else None), content + held_content, closed

    def reasoning_token_count(self, token_ids: Sequence[int], text: str, prompt_tail: str,
                              decode: Callable[[Sequence[int]], str] | None,
                              close_ids: Sequence[int] | None = None) -> int:
        """Output tokens of the thinking span, its closing marker included (all of them when
        it never closes, 0 without one): usage's reasoning_tokens, the cost's thinking tokens."""
        reasoning, _, closed = self.split(text, prompt_tail)
        if reasoning is None:
            return 0
        if not closed:
            return len(token_ids)
        if close_ids:
            width = len(close_ids)
            first = close_ids[0]
            for i in range(len(token_ids) - width + 1):
                if token_ids[i] == first and list(token_ids[i:i + width]) == list(close_ids):
                    return i + width
        if decode is None:
            return len(token_ids)
        # The marker merged with its neighbours into other tokens: the shortest prefix whose
        # text closes the block (closing is monotone in the prefix length).
        low, high = 1, len(token_ids)
        while low < high:
            middle = (low + high) // 2
            if self.split(decode(token_ids[:middle]), prompt_tail)[2]:
                high = middle
            else:
                low = middle + 1
        return low


def get_parser(name: str) -> ReasoningParser:
    """The parser of an explicit family name (not "auto")."""
    if name not in PARSER_NAMES or name == "auto":
        raise InvalidParameterError(
            f"unknown reasoning parser {name!r}; use one of {', '.join(PARSER_NAMES)}", param="reasoning_parser")
    return ReasoningParser(name)


def resolve_parser(name: str, chat_template: str | None, tokenizer=None) -> ReasoningParser:
    """`name`'s parser; for "auto", the family the chat template and tokenizer show: a
    template that mentions <think> and whose generation prompt ends inside the block is
    deepseek_r1-style, one that mentions it otherwise is qwen3-style; without a template
    mention, a tokenizer with a </think> token is qwen3-style, any other model has none."""
    if not isinstance(name, str) or name not in PARSER_NAMES:
        raise InvalidParameterError(
            f"unknown reasoning parser {name!r}; use one of {', '.join(PARSER_NAMES)}", param="reasoning_parser")
    if name != "auto":
        return ReasoningParser(name)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and (THINK_OPEN in template or THINK_CLOSE in template):
        rendered = None
        if tokenizer is not None:
            try:
                rendered = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                                         add_generation_prompt=True, chat_template=template)
            except Exception:  # a template that needs other messages: the family by its text alone
                rendered = None
        if isinstance(rendered, str) and prompt_opens_thinking(rendered):
            return ReasoningParser("deepseek_r1")
        return ReasoningParser("qwen3")
    try:
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    except Exception:
        vocab = {}
    return ReasoningParser("qwen3" if THINK_CLOSE in vocab else "none")
