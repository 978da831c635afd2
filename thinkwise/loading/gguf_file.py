"""Loading a GGUF file: tensors dequantized into Hugging Face names, config, tokenizer.

Tensors are dequantized with `gguf.quants.dequantize` (numpy) and renamed from llama.cpp's
scheme (`blk.N.attn_q.weight`) to Hugging Face's (`model.layers.N.self_attn.q_proj.weight`)
so one model implementation serves every source. The per-layer names and what llama.cpp's
converter did to a tensor (it interleaves the q/k rows of `llama` models; it adds 1 to
Gemma's norm weights) belong to the architecture: its registry entry names the tensors
and undoes the change, exactly as transformers' GGUF loader does, so the weights equal
the original checkpoint's. Dequantizing the
default 0.5B model takes ~15 s on two CPU cores, so the result (in the requested dtype),
the config and the rebuilt tokenizer are cached under the cache entry of the file's
identity; a later load reads only the cache and never parses the GGUF again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thinkwise.errors import ModelFormatError, UnsupportedArchitectureError
from thinkwise.loading.cache import atomic_path, cache_root, file_identity, write_text_atomic
from thinkwise.loading.config import LoadedModel, ModelConfig
from thinkwise.loading.gguf_reading import ensure_gguf_path, field_value, gguf_config, open_gguf, tensor_torch_shape
from thinkwise.loading.tokenizer_cache import gguf_eos_ids, load_gguf_tokenizer, tokenizer_chat_template
from thinkwise.models import registry
from thinkwise.models.architecture import Architecture

logger = logging.getLogger(__name__)

# Bump when the conversion (naming, permutation, config fields) changes: old cache
# entries then stop matching instead of serving stale results.
CACHE_FORMAT = 2  # 2: ModelConfig gained sliding_window, layer_types, options

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that carry no weights of their own: rope_freqs became config.rope_scaling;
# attn_rot_embd is a precomputed table some old converters wrote.
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str, entry: Architecture) -> str | None:
    """The Hugging Face parameter name for a GGUF tensor name of architecture `entry`;
    None for tensors to skip."""
    if _IGNORED.match(gguf_name):
        return None
    if m := _BLOCK.match(gguf_name):
        layer, part, kind = m.groups()
        # Only the parts the entry lists carry biases; any other bias would be silently
        # dropped by the model, so it falls through to the error below.
        if part in entry.gguf_tensors and (kind == "weight" or part in entry.gguf_bias_parts):
            return f"model.layers.{layer}.{entry.gguf_tensors[part]}.{kind}"
    elif (m := _GLOBAL.match(gguf_name)) and m.group(1) in _TOP_LEVEL and m.group(2) == "weight":
        return f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    raise UnsupportedArchitectureError(
        f"GGUF tensor {gguf_name!r} has no counterpart in thinkwise's {entry.name} implementation; "
        f"this file is a variant thinkwise cannot run correctly. Use a plain {entry.name} GGUF."
    )


def dequantize_weights(reader, config: ModelConfig, path: Path, dtype: torch.dtype, progress: bool) -> dict[str, torch.Tensor]:
    """All tensors of an open GGUF as torch tensors in `dtype` under Hugging Face names."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    entry = registry.get(config.architecture)
    weights: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        name = hf_name(tensor.name, entry)
        if name is None:
            continue
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise ModelFormatError(
                f"tensor {tensor.name!r} of {path} (type {tensor.tensor_type.name}) could not be dequantized: {exc}. "
                "The file is corrupted or uses a quantization the installed gguf package does not know; "
                "try `pip install -U gguf` or a differently quantized file."
            ) from exc
        expected = tensor_torch_shape(tensor)
        if tuple(array.shape) != expected:
            # gguf returns [rows, cols] already in torch order; 1-D tensors may come back flat.
            if array.size != int(np.prod(expected)):
                raise ModelFormatError(f"tensor {tensor.name!r} of {path} has {array.size} values, expected shape {expected}")
            array = array.reshape(expected)
        array = entry.gguf_tensor(name, array, config)
        # np.array copies: float32 tensors come back as views of the read-only file mapping.
        weights[name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True)).to(dtype)
    return weights


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _config_to_json(config: ModelConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data["eos_token_ids"] = list(config.eos_token_ids)
    return data


def _config_from_json(data: dict[str, Any]) -> ModelConfig:
    data = dict(data)
    data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
    data["layer_types"] = tuple(data.get("layer_types", ()))
    return ModelConfig(**data)


def _read_meta(entry: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        meta["config"] = _config_from_json(meta["config"])
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_cached_weights(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # a damaged cache file is rebuilt, never fatal
        logger.warning("discarding unreadable cached weights %s: %s", path, exc)
        path.unlink(missing_ok=True)
        return None


def _save_cached_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    try:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    except OSError as exc:  # no space / read-only cache: the next load just dequantizes again
        logger.warning("could not cache dequantized weights in %s: %s", path, exc)


def load_gguf(
    path: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
    cache_dir: str | None = None,
    identity: str | None = None,
    name: str | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> LoadedModel:
    """Load a .gguf file (or the one .gguf inside a directory), using the cache when it can.

    `identity` keys the cache entry (default: path, size and mtime); the default model
    passes its sha256 instead. `eos_token_ids` are extra stop ids known for this file.
    """
    path = ensure_gguf_path(path)
    key = identity or file_identity(path)
    entry = cache_root(cache_dir) / "gguf" / f"v{CACHE_FORMAT}-{key}"
    weights_file = entry / f"weights-{_dtype_name(dtype)}.safetensors"
    timings: dict[str, float] = {}

    meta = _read_meta(entry)
    reader = None
    if meta is None:
        start = time.perf_counter()
        reader = open_gguf(path)
        config = gguf_config(reader, path)
        chat_template = field_value(reader, "tokenizer.chat_template")
        extra_eos = [int(v) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                     if (v := field_value(reader, k)) is not None]
        has_tokenizer = field_value(reader, "tokenizer.ggml.model") is not None
        general_name = field_value(reader, "general.name")
        timings["parse_s"] = time.perf_counter() - start
        start = time.perf_counter()
        tokenizer = load_gguf_tokenizer(path, entry / "tokenizer", has_tokenizer=has_tokenizer, progress=progress)
        timings["tokenizer_s"] = time.perf_counter() - start
        if chat_template is None:
            chat_template = tokenizer_chat_template(tokenizer)
        eos = gguf_eos_ids(config.eos_token_ids + tuple(eos_token_ids), tokenizer, chat_template, extra_eos)
        config = dataclasses.replace(config, eos_token_ids=eos)
        meta = {
            "config": config, "chat_template": chat_template, "general_name": general_name,
            "has_tokenizer": has_tokenizer, "source": str(path),
        }
        try:
            write_text_atomic(entry / "meta.json", json.dumps({**meta, "config": _config_to_json(config)}, indent=1))
        except OSError as exc:
            logger.warning("could not write cache entry %s: %s", entry, exc)
    else:
        start = time.perf_counter()
        tokenizer = load_gguf_tokenizer(path, entry / "tokenizer", has_tokenizer=meta["has_tokenizer"], progress=progress)
        timings["tokenizer_s"] = time.perf_counter() - start
        config = meta["config"]

    start = time.perf_counter()
    weights = _load_cached_weights(weights_file)
    if weights is not None:
        timings["weights_from_cache_s"] = time.perf_counter() - start
    else:
        if reader is None:
            reader = open_gguf(path)
        weights = dequantize_weights(reader, config, path, dtype, progress)
        timings["dequantize_s"] = time.perf_counter() - start
        start = time.perf_counter()
        _save_cached_weights(weights_file, weights)
        timings["cache_write_s"] = time.perf_counter() - start
    del reader  # releases the file mapping

    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=meta["chat_template"],
        source=str(path),
        name=name or path.stem,
        extra={"format": "gguf", "general_name": meta.get("general_name"), "cache_entry": str(entry), "timings": timings},
    )
