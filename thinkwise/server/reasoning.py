"""Splitting a reasoning model's thinking from its answer, for `message.reasoning_content`.

The chat endpoint returns the thinking as `reasoning_content` (the field DeepSeek-style
clients and older vLLM read; newer vLLM names it `reasoning`) and the rest as `content`;
a sample with no thinking block has no `reasoning_content` and its text is all content.
The parsers themselves (per family, whole text and streamed) live in
`thinkwise.reasoning.parser`, below the engine, so answer extraction can use them too;
this module names what the server uses.
"""

from __future__ import annotations

from thinkwise.reasoning.parser import (  # noqa: F401  (re-exported for the server and its tests)
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningParser,
    ReasoningSplitter,
    prompt_opens_thinking,
    split_reasoning,
)
