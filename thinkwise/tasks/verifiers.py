"""Verifiers that score a candidate completion for best-of-n: exact answers, code tests, reward models.

Each verifier has `score(prompt, completion, answer) -> float` and a batch `score_many`.
`ExactChecker` compares the extracted answer with a reference (or asks a checker
function). `RewardModelVerifier` runs a local Hugging Face sequence-classification model
in-process and returns the positive-class logit. `CodeTestVerifier` runs untrusted
model-written code against unit tests in a sandbox; it lives in `sandbox.py` (the code
task family checks with it too) and is re-exported here with its result types.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from thinkwise.errors import InvalidParameterError, ModelFormatError, ModelNotFoundError
from thinkwise.tasks.extraction import answers_equal, extract_answer
from thinkwise.tasks.sandbox import (
    OUTCOMES, CodeTestResult, CodeTestVerifier, TestCaseResult, _as_list, code_from_completion,
)

__all__ = [
    "ExactChecker", "CodeTestVerifier", "CodeTestResult", "TestCaseResult", "RewardModelVerifier",
    "code_from_completion", "OUTCOMES",
]


# ----------------------------------------------------------------------------- exact answers


class ExactChecker:
    """1.0 when the answer is correct, else 0.0.

    `checker` is either a reference answer (compared with `answers_equal`: numbers
    numerically, other answers as normalized strings) or a function from the extracted
    answer (possibly None) to bool. When `score` gets no answer it extracts one from the
    completion with `method`.
    """

    def __init__(self, checker: Callable[[str | None], bool] | str | int | float, *, method: str = "auto"):
        if checker is None:
            raise InvalidParameterError("ExactChecker needs a reference answer or a checker function", param="answer")
        extract_answer("", method)  # validates the method name now, not at the first score
        self.method = method
        if callable(checker):
            self._check = checker
            self.reference = None
        else:
            self.reference = str(checker)
            self._check = lambda answer: answers_equal(answer, self.reference)

    def score(self, prompt: str, completion: str, answer: str | None = None) -> float:
        if answer is None:
            answer = extract_answer(completion, self.method)
        return 1.0 if self._check(answer) else 0.0

    def score_many(self, prompt: str, completions: Sequence[str],
                   answers: Sequence[str | None] | None = None) -> list[float]:
        return [self.score(prompt, c, a) for c, a in zip(completions, _as_list(completions, answers))]


# ----------------------------------------------------------------------------- reward models


class RewardModelVerifier:
    """Scores with a local Hugging Face sequence-classification model (a reward model).

    The model and tokenizer load from `model_dir` only (`local_files_only=True`; nothing
    is downloaded). Prompt and completion are formatted with the tokenizer's chat
    template as a user/assistant exchange when it has one, else concatenated. The score
    is the positive-class logit: the single logit when num_labels == 1, logit[1] -
    logit[0] when 2, the log-probability of `positive_label` otherwise. Batches are
    right-padded with the model's own pad id, so each text's last real token - the one
    the classification head pools - sits where it would unpadded, and a batch scores
    what one-by-one calls do (up to float rounding). `max_length` keeps the last tokens.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", *, batch_size: int = 8,
                 max_length: int | None = None, positive_label: int | None = None, dtype: str = "float32"):
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(
                f"reward model directory {str(path)!r} does not exist; pass a local Hugging Face "
                "sequence-classification directory (config.json, weights, tokenizer)", param="reward_model")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{str(path)!r} has no config.json; pass a Hugging Face model directory saved with save_pretrained",
                param="reward_model")
        if batch_size < 1:
            raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}", param="batch_size")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as error:  # transformers raises several types for unreadable configs
            raise ModelFormatError(f"cannot read the config in {str(path)!r}: {error}") from error
        architectures = getattr(config, "architectures", None) or []
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            # Loading a causal LM here would silently attach a randomly initialized head.
            raise InvalidParameterError(
                f"{str(path)!r} is a {architectures[0]} checkpoint, not a sequence-classification reward model; "
                "pass a directory whose config lists a *ForSequenceClassification architecture",
                param="reward_model")
        num_labels = config.num_labels
        if num_labels > 2 and (positive_label is None or not 0 <= positive_label < num_labels):
            raise InvalidParameterError(
                f"the reward model has {num_labels} labels; pass positive_label= one of 0..{num_labels - 1}",
                param="positive_label")
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise InvalidParameterError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16", param="dtype")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, dtype=torch_dtype).to(device).eval()
        except (OSError, ValueError) as error:
            raise ModelFormatError(f"cannot load the reward model in {str(path)!r}: {error}") from error
        # transformers pools each row at its rightmost token that is not config.pad_token_id,
        # so rows must be padded with exactly that id - not with whatever pad token the
        # tokenizer brings (some add one outside the model's vocabulary).
        pad_id = self.model.config.pad_token_id
        if pad_id is None:
            vocab = self.model.get_input_embeddings().num_embeddings
            candidates = (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0)
            pad_id = next(i for i in candidates if i is not None and 0 <= i < vocab)
            self.model.config.pad_token_id = pad_id
        self.pad_id = int(pad_id)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_labels = num_labels
        self.positive_label = positive_label
        self._torch = torch

    def _text(self, prompt: str, completion: str) -> tuple[str, bool]:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False), False
        return prompt + completion, True

    def score(self, prompt: str, completion: str, answer: str | None = None) -> float:
        return self.score_many(prompt, [completion])[0]

    def score_many(self, prompt: str, completions: Sequence[str],
                   answers: Sequence[str | None] | None = None) -> list[float]:
        _as_list(completions, answers)
        return self.score_pairs([(prompt, c) for c in completions])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of (prompt, completion) pairs, batched by similar length."""
        torch = self._torch
        texts = [self._text(prompt, completion) for prompt, completion in pairs]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]))
        scores = [0.0] * len(texts)
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            rows = []
            for i in indices:
                text, add_special = texts[i]
                # A chat template already holds its special tokens; plain text gets the tokenizer's.
                ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
                if self.max_length is not None:
                    ids = ids[-self.max_length:]  # keep the end of the completion, where the answer is
                rows.append(ids or [self.pad_id])
            width = max(len(row) for row in rows)
            # Right padding: causal attention keeps every real token's state as if unpadded.
            input_ids = torch.tensor([row + [self.pad_id] * (width - len(row)) for row in rows], device=self.device)
            attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows],
                                          device=self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits.float()
            if self.num_labels == 1:
                values = logits[:, 0]
            elif self.num_labels == 2:
                values = logits[:, 1] - logits[:, 0]
            else:
                values = torch.log_softmax(logits, dim=-1)[:, self.positive_label]
            for i, value in zip(indices, values.tolist()):
                scores[i] = float(value)
        return scores
