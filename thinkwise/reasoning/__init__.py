"""Reasoning models: splitting a thinking span from the answer (see `parser`)."""

from thinkwise.reasoning.parser import (
    PARSER_NAMES,
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningParser,
    ReasoningSplitter,
    answer_part,
    get_parser,
    prompt_opens_thinking,
    resolve_parser,
    split_reasoning,
)

__all__ = ["PARSER_NAMES", "THINK_CLOSE", "THINK_OPEN", "ReasoningParser", "ReasoningSplitter", "answer_part",
           "get_parser", "prompt_opens_thinking", "resolve_parser", "split_reasoning"]
