"""Loading a Hugging Face model directory: config.json, safetensors weights, tokenizer.

The directory is read as `save_pretrained` writes it: `config.json`, one
`model.safetensors` or shards listed by `model.safetensors.index.json`, optional tokenizer
files, optional `generation_config.json` and chat template files. The config is mapped by
hand rather than through `transformers.AutoConfig` so that what thinkwise cannot run
(another model_type, biases on o_proj or the MLP, an activation the model does not
implement) is refused with a clear error instead of producing wrong text. The fields
every architecture shares are read here; the model registry's entry for the model_type
reads the rest and refuses what its model class cannot run. The transformers-4
(`rope_theta`/`rope_scaling`) and transformers-5 (`rope_parameters`) ways of writing
rotary settings are both read. Nothing is ever fetched from the Hub.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from thinkwise.errors import ModelFormatError, UnsupportedArchitectureError
from thinkwise.loading.config import LoadedModel, ModelConfig, hf_rope_settings
from thinkwise.models import registry
from thinkwise.loading.tokenizer_cache import (
    as_id_tuple,
    load_hf_tokenizer,
    read_chat_template_files,
    tokenizer_chat_template,
)

INDEX_FILE = "model.safetensors.index.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"{path} could not be read as JSON ({exc}); re-download or fix the file") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} does not hold a JSON object; re-download or fix the file")
    return data


def hf_config(directory: Path, raw: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a parsed config.json (eos ids are filled in by the caller)."""
    entry = registry.for_hf_model_type(raw.get("model_type"), str(directory))
    if isinstance(raw.get("text_config"), dict) and "hidden_size" not in raw:
        raise UnsupportedArchitectureError(
            f"{directory}: it is a multimodal wrapper config, which thinkwise does not run; use the text-only "
            f"checkpoint. Supported: {registry.supported_list()}"
        )
    config_file = directory / "config.json"
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = raw.get("num_key_value_heads")
        theta, rope_scaling = hf_rope_settings(raw)
        head_dim = raw.get("head_dim")
        fields: dict[str, Any] = dict(
            architecture=entry.name,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else int(kv_heads),
            head_dim=int(head_dim) if head_dim else hidden // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            # The Llama-family config classes default to untied embeddings; an entry whose
            # class defaults otherwise (Gemma 3) overrides this.
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
        )
        fields = entry.hf_config(raw, fields)
        return ModelConfig(**fields)
    except registry.Unsupported as exc:
        raise UnsupportedArchitectureError(
            f"{directory}: {exc}, which thinkwise's {entry.name} implementation does not support; "
            f"use a standard checkpoint of one of: {registry.supported_list()}"
        ) from exc
    except KeyError as exc:
        raise ModelFormatError(f"{config_file} lacks the required key {exc}; re-download config.json") from exc
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"{config_file} has a malformed value ({exc}); re-download config.json") from exc


def _shard_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{index} has no weight_map; re-download it")
        shards = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelFormatError(
                f"{directory} is missing the weight shard(s) {', '.join(missing)} listed in {INDEX_FILE}; "
                "the download is incomplete: download the missing files"
            )
        return shards
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        extra = " (it has .bin/.pt PyTorch weights: convert them to safetensors)" if any(
            directory.glob("*.bin")
        ) or any(directory.glob("*.pt")) else ""
        raise ModelFormatError(
            f"{directory} has no *.safetensors weights{extra}; thinkwise loads Hugging Face directories with "
            "safetensors weights (save with `model.save_pretrained(dir)`, which writes them by default)"
        )
    return shards


def load_safetensors(shards: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            tensors = load_file(str(shard))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFormatError(
                f"{shard} could not be read as safetensors ({exc}); it is truncated or corrupted: download it again"
            ) from exc
        for name, tensor in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
                continue
            weights[name] = tensor.to(dtype)
    # Checkpoints saved from the bare decoder (LlamaModel, not ...ForCausalLM) lack the
    # "model." prefix the rest of thinkwise expects.
    if weights and not any(n.startswith("model.") for n in weights):
        weights = {(n if n.startswith("lm_head.") else f"model.{n}"): t for n, t in weights.items()}
    return weights


def _eos_ids(directory: Path, raw: dict[str, Any], tokenizer: Any | None) -> tuple[int, ...]:
    """generation_config.json's eos (what HF generate stops on), else config.json's, else the tokenizer's."""
    generation = directory / "generation_config.json"
    if generation.is_file():
        ids = as_id_tuple(_read_json(generation).get("eos_token_id"))
        if ids:
            return ids
    ids = as_id_tuple(raw.get("eos_token_id"))
    if ids:
        return ids
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return (int(tokenizer.eos_token_id),)
    return ()


def load_hf_dir(directory: Path, *, dtype: torch.dtype = torch.bfloat16, name: str | None = None) -> LoadedModel:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelFormatError(
            f"{directory} has no config.json, so it is not a Hugging Face model directory; pass a directory "
            "with config.json and *.safetensors, a .gguf file, or 'default'"
        )
    raw = _read_json(config_file)
    config = hf_config(directory, raw)
    shards = _shard_files(directory)
    tokenizer = load_hf_tokenizer(directory)
    chat_template = tokenizer_chat_template(tokenizer) or read_chat_template_files(directory)
    if tokenizer is not None and chat_template and not tokenizer_chat_template(tokenizer):
        tokenizer.chat_template = chat_template  # so tokenizer.apply_chat_template works too
    eos = _eos_ids(directory, raw, tokenizer)
    if config.bos_token_id is None and tokenizer is not None and getattr(tokenizer, "bos_token_id", None) is not None:
        bos = int(tokenizer.bos_token_id)
    else:
        bos = config.bos_token_id
    config = dataclasses.replace(config, eos_token_ids=eos, bos_token_id=bos)
    weights = load_safetensors(shards, dtype)
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=chat_template,
        source=str(directory),
        name=name or directory.name,
        extra={"format": "hf", "shards": [s.name for s in shards]},
    )
