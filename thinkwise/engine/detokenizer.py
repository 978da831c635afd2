"""Incremental detokenization and stop-string detection.

Decoding the whole output every step costs O(length) per token; instead each sequence
decodes a small sliding window: the text of tokens[prefix:read] versus tokens[prefix:]
gives exactly the new characters, and both sides lose the same leading-space
artefacts of SentencePiece-style tokenizers. A window that ends inside a multi-byte
character (decodes to U+FFFD) waits for the next token.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 6  # prompt tokens kept as left context so the first output decodes right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)

    def copy(self) -> "IncrementalDetokenizer":
        clone = IncrementalDetokenizer.__new__(IncrementalDetokenizer)
        clone.__dict__.update(self.__dict__)
        clone.tokens = list(self.tokens)
        return clone

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.tokens.append(token_id)
        return self._advance(final=False)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end)."""
        if self.read_offset == len(self.tokens):
            return ""
        return self._advance(final=True)


def find_stop_string(text: str, new_text_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newly added text: (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_text_len - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
