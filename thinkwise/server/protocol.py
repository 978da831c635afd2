"""The OpenAI wire format: pydantic models of what the server accepts and returns.

Request models are strict (a string is not a number, a number is not a string) and
forbid unknown fields, so a typo or an unsupported OpenAI feature is answered with a
400 that names the field instead of being silently ignored; the same models generate
the OpenAPI schema, so the schema states exactly what is accepted. Fields OpenAI
defines but thinkwise cannot honour (logit bias, tools, ...) are declared
so that their neutral values pass and anything else is refused by the serving layer
with a message. Response models document the JSON the server writes; the hot streaming
path builds the same shapes as plain dicts (see `streaming.py`), and tests validate
those chunks against these models.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from annotated_types import Ge
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 16.0; strict pydantic would not. Strings and bools stay refused.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _unsupported_unless_empty(value: dict) -> dict:
    if value:
        raise ValueError("is not supported by thinkwise; leave it unset or empty")
    return value


_AS_INT = BeforeValidator(_integral)
EmptyOnly = Annotated[dict[str, float], AfterValidator(_unsupported_unless_empty),
                      WithJsonSchema({"type": "object", "maxProperties": 0,
                                      "description": "not supported by thinkwise: only {}"})]

NonEmptyStr = Annotated[str, Field(min_length=1)]
StopField = NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=16)] | None


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool | None = False


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    """One message of a conversation; content is text or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    # What OpenAI returns on an assistant message, so a response can be sent back as
    # history; only their empty values are accepted (thinkwise has no tool calls).
    refusal: str | None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    tool_call_id: str | None = None
    function_call: None = None
    audio: None = None
    annotations: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ResponseFormat(StrictModel):
    type: Literal["text"]


class _SamplingFields(StrictModel):
    """Fields shared by chat and completions requests."""

    model: str
    max_tokens: Annotated[int, Field(ge=1), _AS_INT] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1), _AS_INT] | None = None
    stop: StopField = None
    seed: Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX), _AS_INT] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Penalties with vLLM's semantics and ranges (engine/penalties.py): 0, 0 and 1 are neutral.
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    logit_bias: EmptyOnly | None = None
    # Extensions in the vLLM vocabulary.
    top_k: Annotated[int, Field(ge=-1), _AS_INT] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0), _AS_INT] | None = None
    ignore_eos: bool | None = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ThinkwiseOptions(BaseModel):
    """`extra_body={"thinkwise": {...}}`: run a test-time strategy on this chat request."""

    # Other fields are strategy parameters (round_size, threshold, eta, tau, ...), checked against
    # the strategy registry by strategy_serving.requested_strategy (an unknown one is a 400 naming it).
    model_config = ConfigDict(strict=True, extra="allow")
    strategy: Annotated[str, Field(min_length=1, max_length=200, description=(
        "a strategy string (see thinkwise.strategies.STRATEGY_HELP), e.g. majority@8, short-3@8, "
        "deepconf@16(eta=10); may be left out when the model name has a strategy prefix"))] | None = None
    k: Annotated[int, Field(ge=1, le=256), _AS_INT] | None = None
    m: Annotated[int, Field(ge=1, le=256), _AS_INT] | None = None
    budget: Annotated[int, Field(ge=1), _AS_INT] | None = None
    extract: Literal["auto", "boxed", "answer_line", "last_number", "choice", "code"] = "auto"
    answer: Annotated[str, Field(max_length=10_000, description="reference answer: an exact checker for best-of-n")] \
        | None = None


_TEMPLATE_KWARG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# What transformers' apply_chat_template passes itself or the template reads as the conversation:
# a request must not replace them (template injection), so they are refused by name.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "tools", "documents", "chat_template", "add_generation_prompt", "tokenize",
    "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "continue_final_message", "tokenizer_kwargs", "raise_exception", "strftime_now", "bos_token", "eos_token",
    "unk_token", "pad_token", "namespace", "range", "dict", "cycler", "joiner", "lipsum", "self", "loop",
})
MAX_TEMPLATE_KWARGS_BYTES = 4096


def _json_depth(value: Any, depth: int = 0) -> int:
    if isinstance(value, dict):
        return max((_json_depth(v, depth + 1) for v in value.values()), default=depth + 1)
    if isinstance(value, list):
        return max((_json_depth(v, depth + 1) for v in value), default=depth + 1)
    return depth


def check_template_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > 16:
        raise ValueError(f"has {len(value)} keys; at most 16 are accepted")
    for key in value:
        if not _TEMPLATE_KWARG_KEY.fullmatch(key):
            raise ValueError(f"key {key[:40]!r} is not a template variable name (letters, digits, _; at most 64)")
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"key {key!r} is set by the server itself and cannot be passed to the chat template")
    if _json_depth(value) > 4:
        raise ValueError("nests deeper than 4 levels")
    size = len(json.dumps(value))
    if size > MAX_TEMPLATE_KWARGS_BYTES:
        raise ValueError(f"is {size} bytes as JSON; at most {MAX_TEMPLATE_KWARGS_BYTES} are accepted")
    return value


TemplateKwargs = Annotated[dict[str, Any], AfterValidator(check_template_kwargs), Field(description=(
    "variables for the chat template, e.g. {\"enable_thinking\": false} for Qwen3; names the template itself "
    "receives (messages, tools, add_generation_prompt, ...) are refused"))]


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # Reasoning models (thinkwise/reasoning/, README "Reasoning models").
    chat_template_kwargs: TemplateKwargs | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    thinking_token_budget: Annotated[int, Field(ge=1, description=(
        "most thinking tokens before the end-of-thinking marker is forced (as budget:N)")), _AS_INT] | None = None
    thinking_budget_message: Annotated[str, Field(max_length=1000, description=(
        "text forced before the end-of-thinking marker when the budget runs out"))] | None = None
    reasoning_parser: Literal["auto", "deepseek_r1", "qwen3", "none"] | None = None
    thinkwise: ThinkwiseOptions | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), _AS_INT] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20), _AS_INT] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


PromptField = (
    str
    | Annotated[list[str], Field(min_length=1, max_length=64)]
    | Annotated[list[Annotated[int, Ge(0), _AS_INT]], Field(min_length=1)]
    | Annotated[list[Annotated[list[Annotated[int, Ge(0), _AS_INT]], Field(min_length=1)]], Field(min_length=1, max_length=64)]
)


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    logprobs: Annotated[int, Field(ge=0, le=20), _AS_INT] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1, le=1, description="only 1: use n, or thinkwise's strategies"), _AS_INT] | None = None
    suffix: None = None


# ---------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="completion tokens of thinking spans, closing markers included")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


REASONING_DOC = ("a reasoning model's thinking (between <think> and </think>), absent when the sample has none; "
                 "content holds the rest (thinkwise/server/reasoning.py)")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = Field(default=None, description=REASONING_DOC)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length" (or "abort" if the server shut down mid-way)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = Field(default=None, description=REASONING_DOC)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A completion; streamed, each `data:` event has this shape with partial text and usage null."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "thinkwise"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class EngineHealth(BaseModel):
    running_sequences: int
    waiting_sequences: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_used: int
    steps: int


class HealthResponse(BaseModel):
    status: Literal["ok", "error"]
    model: str | None = Field(None, description="the first served model's name; absent when an API key is set")
    requests_in_flight: int
    sequences_in_flight: int
    engine: EngineHealth | None = None
    error: str | None = None
