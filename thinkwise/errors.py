"""Errors a user can cause, each with a message that says what to do next.

Every exception raised for bad input (a wrong model path, a corrupted file, a prompt
that does not fit, a sampling parameter out of range) derives from `ThinkwiseError`, so
callers can catch one type; the server maps each class to an OpenAI-style 4xx status via
`http_status`. Internal bugs are *not* ThinkwiseErrors: they surface as ordinary
exceptions and become 500s.
"""

from __future__ import annotations


class ThinkwiseError(Exception):
    """Base class: a problem the caller can fix; `http_status` is the HTTP status."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ModelNotFoundError(ThinkwiseError):
    """The model reference names nothing on disk (or an unknown served model)."""

    http_status = 404
    error_type = "not_found_error"


class ModelFormatError(ThinkwiseError):
    """A model file exists but is unreadable: truncated, corrupted, or missing parts."""


class ChecksumMismatchError(ModelFormatError):
    """Assembled model bytes do not hash to the expected sha256."""


class UnsupportedArchitectureError(ThinkwiseError):
    """The model's architecture is not one thinkwise implements."""


class InvalidParameterError(ThinkwiseError, ValueError):
    """A request parameter is out of range or of the wrong kind."""

    http_status = 400


class PromptTooLongError(InvalidParameterError):
    """Prompt (plus requested tokens) does not fit the model's context window."""


class CapacityError(ThinkwiseError):
    """The engine cannot hold this request at all (KV cache too small for it)."""

    http_status = 413
