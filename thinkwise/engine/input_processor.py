"""Request intake: what a caller gives (text, token ids, a prompt dict, chat messages)
turned into checked prompt token ids, before anything is queued.

Every entry point (`Engine.add_request`, the offline `LLM`, the strategies' prompts, the
server) goes through this one class, so a prompt is normalised one way and refused with
one message: empty, ids outside the vocabulary, too long for the context, or needing more
KV blocks than the cache has. It also turns a request's thinking controls into the token
ids the output side watches for (the end-of-thinking marker, what is forced at the budget).
"""

from __future__ import annotations

from typing import Any

from thinkwise.engine.block_manager import blocks_for
from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.errors import CapacityError, InvalidParameterError, PromptTooLongError

# A prompt as the offline API takes it: text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...}.
Prompt = str | list[int] | dict[str, Any]


class InputProcessor:
    def __init__(self, tokenizer: Any, chat_template: str | None, *, vocab_size: int, max_model_len: int,
                 num_kv_blocks: int, block_size: int):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size

    # ------------------------------------------------------------------ tokens
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidParameterError(
                "this model has no tokenizer, so prompts must be token ids (a list of ints)", param="prompt"
            )
        return list(self.tokenizer.encode(prompt))

    def prompt_ids(self, prompt: Prompt | None,
                   prompt_token_ids: list[int] | None = None) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt in any accepted form; `prompt_token_ids`,
        when given, are the ids and `prompt` only the text that produced them."""
        if prompt_token_ids is not None:
            return (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        if isinstance(prompt, str):
            return prompt, self.tokenize(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenize(prompt["prompt"])
            raise InvalidParameterError("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise InvalidParameterError("prompt must be a string or a list of token ids", param="prompt")

    # ------------------------------------------------------------------ chat templates
    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer is not None
                    and (self.chat_template or getattr(self.tokenizer, "chat_template", None)))

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool = True,
                            chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (or `chat_template`)."""
        if self.tokenizer is None:
            raise InvalidParameterError("this model has no tokenizer, so chat() is unavailable", param="messages")
        template = chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InvalidParameterError(
                "this model has no chat template; pass chat_template=... or use generate() with a plain prompt",
                param="messages",
            )
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise InvalidParameterError("each message must be a dict with 'role' and 'content'", param="messages")
        text = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
            chat_template=template, **template_kwargs,
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ checks
    def check_prompt(self, ids: list[int]) -> None:
        """Refuse a prompt this engine cannot serve, with a message that says what to change."""
        if not ids:
            raise InvalidParameterError("the prompt is empty; give at least one token", param="prompt")
        vocab = self.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise InvalidParameterError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but the model's context holds {self.max_model_len} "
                "(prompt plus at least one generated token); shorten the prompt",
                param="prompt",
            )
        needed = blocks_for(len(ids) + 1, self.block_size)
        if needed > self.num_kv_blocks:
            raise CapacityError(
                f"the prompt needs {needed} KV blocks but the cache has only "
                f"{self.num_kv_blocks}; raise --kv-blocks (or the KV memory budget)"
            )

    def thinking_markers(self, params: SamplingParams) -> tuple[list[int], list[int]] | None:
        """Token ids of the end-of-thinking marker and of what is forced after it."""
        if params.thinking_budget is None and params.min_thinking_tokens == 0:
            return None
        if self.tokenizer is None:
            raise InvalidParameterError("thinking budgets need a tokenizer to find the end-of-thinking marker",
                                        param="thinking_budget")
        end = list(self.tokenizer.encode(params.thinking_end, add_special_tokens=False))
        forced = end + list(self.tokenizer.encode(params.answer_prefix, add_special_tokens=False))
        if params.min_thinking_tokens and len(end) != 1:
            raise InvalidParameterError(
                f"min_thinking_tokens needs an end-of-thinking marker that is one token; {params.thinking_end!r} "
                f"is {len(end)} tokens for this tokenizer",
                param="min_thinking_tokens",
            )
        return end, forced
