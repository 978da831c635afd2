"""Tokenizers, chat templates and end-of-sequence ids, for both GGUF files and HF directories.

A GGUF carries its tokenizer as metadata (vocabulary, merges, special ids, chat template);
`transformers` can rebuild a fast tokenizer from it, but that takes ~10 s for a 150k-token
vocabulary, so the rebuilt tokenizer is saved with `save_pretrained` into the model's cache
entry and reloaded from there (under a second) afterwards. Hugging Face directories are
loaded directly and strictly locally. The end-of-sequence rules live here too because they
depend on the tokenizer: the engine stops on any id in `ModelConfig.eos_token_ids`, so the
set must contain the model's configured EOS and whatever token ends an assistant turn.
"""

from __future__ import annotations

import json
import logging
import warnings
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from thinkwise.errors import ModelFormatError
from thinkwise.loading.cache import atomic_path

logger = logging.getLogger(__name__)

# Files whose presence means a Hugging Face directory ships a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
# Tokens that end a turn or a document in the chat formats of the supported families
# (ChatML for Qwen/SmolLM, Llama 3's header format).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                      "<end_of_turn>")  # the last: Gemma


def load_hf_tokenizer(directory: Path) -> Any | None:
    """The directory's tokenizer via AutoTokenizer (local files only), or None if it has none."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise ModelFormatError(
            f"the tokenizer files in {directory} could not be loaded ({type(exc).__name__}: {exc}); "
            "re-download them (tokenizer.json, tokenizer_config.json, ...) or remove them to run without a tokenizer"
        ) from exc


def load_gguf_tokenizer(gguf_path: Path, cached: Path, *, has_tokenizer: bool, progress: bool = False) -> Any | None:
    """The GGUF's tokenizer, from the `cached` save_pretrained directory or rebuilt (and saved)."""
    from transformers import AutoTokenizer

    if cached.is_dir():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception as exc:  # a damaged cache entry is rebuilt, never fatal
            logger.warning("discarding unreadable cached tokenizer %s: %s", cached, exc)
            import shutil

            shutil.rmtree(cached, ignore_errors=True)
    if not has_tokenizer:
        return None
    from thinkwise.loading.gguf_reading import fast_gguf_reader_for_transformers

    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"building the tokenizer from {gguf_path.name} (once; it is cached afterwards)", file=sys.stderr)
    try:
        with fast_gguf_reader_for_transformers(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
            )
    except Exception as exc:
        raise ModelFormatError(
            f"could not build a tokenizer from the metadata of {gguf_path} ({type(exc).__name__}: {exc}); "
            "the file's tokenizer section is damaged or of a kind transformers cannot convert"
        ) from exc
    try:
        with atomic_path(cached, is_dir=True) as tmp:
            tokenizer.save_pretrained(str(tmp))
    except OSError as exc:  # a read-only cache only costs time on the next load
        logger.warning("could not cache the tokenizer in %s: %s", cached, exc)
    return tokenizer


def read_chat_template_files(directory: Path) -> str | None:
    """chat_template.jinja, else chat_template.json's "chat_template", if the directory has one."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = directory / "chat_template.json"
    if as_json.is_file():
        try:
            template = json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise ModelFormatError(f"{as_json} is not valid JSON ({exc}); fix or delete it") from exc
        return template if isinstance(template, str) else None
    return None


def tokenizer_chat_template(tokenizer: Any | None) -> str | None:
    """The tokenizer's default chat template (a dict of named templates picks "default")."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) else None


def as_id_tuple(value: Any) -> tuple[int, ...]:
    """An eos_token_id setting (int, list of ints or None) as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value if v is not None)
    return (int(value),)


def _token_id(tokenizer: Any, token: str) -> int | None:
    try:
        vocab_id = tokenizer.convert_tokens_to_ids(token)
    except Exception:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if vocab_id is None or (unk is not None and vocab_id == unk and token != getattr(tokenizer, "unk_token", None)):
        return None
    return int(vocab_id)


def gguf_eos_ids(
    configured: Iterable[int], tokenizer: Any | None, chat_template: str | None, extra: Iterable[int] = ()
) -> tuple[int, ...]:
    """EOS ids for a GGUF model: the configured one(s) first, then end-of-turn tokens.

    A GGUF records one eos id (plus, from some converters, eot/eom ids passed as `extra`).
    Chat models end a turn with a token their template writes after each message
    (`<|im_end|>`, `<|eot_id|>`); if that is not the recorded eos the model would run on
    past its answer, so such tokens are added when the template uses them. The
    tokenizer's own eos is added as well (it is the recorded one for the files we know).
    """
    ids = list(configured) + list(extra)
    if tokenizer is not None:
        if getattr(tokenizer, "eos_token_id", None) is not None:
            ids.append(int(tokenizer.eos_token_id))
        for token in END_OF_TURN_TOKENS:
            if chat_template and token in chat_template:
                token_id = _token_id(tokenizer, token)
                if token_id is not None:
                    ids.append(token_id)
    return tuple(dict.fromkeys(ids))  # de-duplicated, order kept
