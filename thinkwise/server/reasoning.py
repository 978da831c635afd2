"""Splitting a reasoning model's thinking from its answer, for `message.reasoning_content`.

Reasoning models write their thinking between `<think>` and `</think>`, then the answer;
some chat templates open the block themselves (the prompt ends with `<think>`, as
DeepSeek-R1's and Qwen3's thinking mode do), so the output holds only the closing tag.
The chat endpoint returns the thinking as `reasoning_content` (the field DeepSeek-style
clients and older vLLM read; newer vLLM names it `reasoning`) and the rest as `content`;
a sample with no thinking block has no `reasoning_content` and its text is all content.
`ReasoningSplitter` does this incrementally for streams: it holds back only the few
characters that could still be the start of a tag, so the streamed pieces join to exactly
the non-streamed message.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """Whether a rendered prompt (its last characters) leaves the model inside a thinking block."""
    return prompt_tail.rstrip().endswith(THINK_OPEN)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag` (held back: it may grow into the tag)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ReasoningSplitter:
    """One sample's text, fed in pieces, split into (reasoning, content) pieces."""

    def __init__(self, in_thinking: bool = False):
        self.state = "think" if in_thinking else "start"  # start: not yet known whether the output opens <think>
        self.thought = in_thinking  # the sample has a thinking block (reasoning_content is sent)
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        reasoning = content = ""
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.buffer, self.state, self.thought = stripped[len(THINK_OPEN):], "think", True
                    continue
                if THINK_OPEN.startswith(stripped):  # "", "<", "<th", ...: cannot tell yet
                    return reasoning, content
                self.state = "content"
            if self.state == "think":
                end = self.buffer.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self.buffer[:end]
                    self.buffer, self.state = self.buffer[end + len(THINK_CLOSE):], "content"
                    continue
                keep = _partial_tag(self.buffer, THINK_CLOSE)
                reasoning += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return reasoning, content
            content += self.buffer
            self.buffer = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        """The text held back, once the sample has ended."""
        held, self.buffer = self.buffer, ""
        return (held, "") if self.state == "think" else ("", held)


def split_reasoning(text: str, in_thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a whole sample; reasoning is None when it has no thinking block."""
    splitter = ReasoningSplitter(in_thinking)
    reasoning, content = splitter.feed(text)
    held_reasoning, held_content = splitter.flush()
    return (reasoning + held_reasoning if splitter.thought else None), content + held_content
