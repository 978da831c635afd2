"""Opening GGUF files safely and quickly, and turning their metadata into a `ModelConfig`.

`open_gguf` wraps `gguf.GGUFReader` so that every way a file can be bad (not a GGUF,
truncated, corrupted, a shard of a split model) becomes a `ModelFormatError` that says
what to do, and checks explicitly that every tensor's bytes lie inside the file (the
reader itself maps the file lazily and would only fail later, or not at all). It also
works around the reader's slowness: it parses each of the ~300k tokenizer strings through
`np.memmap.__getitem__`, whose Python-level `__array_finalize__` hook dominates the time
(~20-30 s for a 150k-token vocabulary); handing the reader a plain ndarray view of the
same mapping makes parsing 4-5x faster with identical results. `gguf_config` reads the
`{arch}.*` hyperparameters the way llama.cpp writes them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

from thinkwise.errors import ModelFormatError, UnsupportedArchitectureError
from thinkwise.loading.config import ModelConfig
from thinkwise.models import registry


class FastGGUFReader(GGUFReader):
    """GGUFReader whose `data` is a plain ndarray view of the memory map (same bytes).

    GGUFReader.__init__ assigns `self.data = np.memmap(...)` before parsing; the property
    setter below intercepts that one assignment. Slicing a plain ndarray skips memmap's
    Python hooks, which is where the reader spends most of its time on large vocabularies.
    """

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        # .view keeps the memmap alive as the view's base, so the mapping stays valid.
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


@contextlib.contextmanager
def fast_gguf_reader_for_transformers() -> Iterator[None]:
    """Let transformers' GGUF tokenizer conversion use FastGGUFReader while inside.

    transformers does `from gguf import GGUFReader` inside its loader function, so
    swapping the module attribute is seen by it. The subclass behaves identically, so
    another thread reading a GGUF meanwhile is unaffected apart from going faster.
    """
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = FastGGUFReader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _format_error(path: Path, why: str) -> ModelFormatError:
    return ModelFormatError(
        f"{path} is not a usable GGUF file ({why}). It may be truncated or corrupted, e.g. by an "
        "interrupted download: download it again, or check that the path names the right file."
    )


def open_gguf(path: Path) -> GGUFReader:
    """Parse a GGUF's header and tensor table; ModelFormatError for anything unreadable."""
    try:
        size = path.stat().st_size
        if size == 0:
            raise _format_error(path, "the file is empty")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise _format_error(path, f"it does not start with the GGUF magic bytes, it starts with {magic!r}")
        reader = FastGGUFReader(path)
    except ModelFormatError:
        raise
    except Exception as exc:  # the reader signals damage with ValueError, IndexError, KeyError, ...
        raise _format_error(path, f"{type(exc).__name__}: {exc}") from exc
    split_count = field_value(reader, "split.count")
    if split_count is not None and int(split_count) > 1:
        raise ModelFormatError(
            f"{path} is one shard of a GGUF split into {int(split_count)} files; thinkwise loads single-file "
            "GGUFs: merge the shards first with `llama-gguf-split --merge FIRST-SHARD.gguf merged.gguf`."
        )
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise _format_error(
                path, f"tensor {tensor.name!r} needs bytes up to offset {end} but the file has only {size} bytes"
            )
    return reader


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str/list, or `default` if the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception as exc:
        raise ModelFormatError(f"GGUF metadata {key!r} is unreadable ({exc}); the file may be corrupted") from exc


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(str(np.float32(value)))  # str() is the shortest float32 round-trip text


def tensor_torch_shape(tensor) -> tuple[int, ...]:
    """GGUF lists dimensions fastest-first (ne0, ne1, ...); torch lists them slowest-first."""
    return tuple(int(d) for d in reversed(tensor.shape))


def gguf_architecture(reader: GGUFReader, path: Path) -> str:
    """The file's general.architecture, checked against the model registry."""
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError(f"{path} has no general.architecture metadata; it is not a model GGUF (or is corrupted)")
    registry.for_gguf(arch, str(path))
    return arch


def llama3_rope_from_factors(factors: np.ndarray, head_dim: int, theta: float, hints: dict[str, Any]) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores Llama 3.1+ frequency scaling as per-frequency divisors rather than the
    four HF parameters. The divisors are a fixed function of those parameters, so we try
    the published Llama 3.x values (factor = largest divisor) and accept them only if they
    reproduce the tensor exactly; anything else is refused rather than guessed.
    """
    factor = float(factors.max())
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    originals = [int(hints["original_max_position_embeddings"])] if "original_max_position_embeddings" in hints else []
    for old in originals + [8192, 4096, 16384]:
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            smooth = (old / wavelen - low) / (high - low)
            expected = np.where(
                wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth))
            )
            if np.allclose(expected, factors, rtol=1e-5, atol=1e-6):
                return {
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": old,
                }
    raise UnsupportedArchitectureError(
        "this GGUF's rope_freqs tensor (per-frequency rope scaling) does not match Llama 3's scheme with any "
        "known parameters; thinkwise cannot reproduce its positions. Use the Hugging Face checkpoint instead."
    )


def gguf_config(reader: GGUFReader, path: Path) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata plus what the tensor table implies; the
    registry entry of the architecture adds and checks its own settings."""
    arch = gguf_architecture(reader, path)
    entry = registry.for_gguf(arch, str(path))
    tensors = {t.name: t for t in reader.tensors}

    def need(key: str) -> Any:
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelFormatError(f"{path} lacks the GGUF metadata {arch}.{key}; the file is incomplete or corrupted")
        return value

    if "token_embd.weight" not in tensors:
        raise ModelFormatError(f"{path} has no token_embd.weight tensor; the file is incomplete or corrupted")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = field_value(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts (hybrid models); ours are uniform
        if len(set(kv_heads)) != 1:
            raise UnsupportedArchitectureError(f"{path} has per-layer KV head counts, which thinkwise does not support")
        kv_heads = kv_heads[0]
    head_dim = int(field_value(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = field_value(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise UnsupportedArchitectureError(
            f"{path} applies rotary embeddings to {rope_dim} of {head_dim} head dimensions (partial rotary), "
            f"which thinkwise's {entry.name} implementation does not support"
        )
    theta = _f32(field_value(reader, f"{arch}.rope.freq_base", 10000.0))

    rope_scaling = None
    scaling_type = field_value(reader, f"{arch}.rope.scaling.type")
    hints: dict[str, Any] = {}
    original = field_value(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        hints["original_max_position_embeddings"] = int(original)
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, **hints}
        factor = field_value(reader, f"{arch}.rope.scaling.factor")
        if factor is not None:
            rope_scaling["factor"] = _f32(factor)
    elif field_value(reader, f"{arch}.rope.scale_linear") is not None:  # older converters
        rope_scaling = {"rope_type": "linear", "factor": _f32(field_value(reader, f"{arch}.rope.scale_linear"))}
    if "rope_freqs.weight" in tensors:
        from gguf.quants import dequantize

        t = tensors["rope_freqs.weight"]
        factors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        if not np.allclose(factors, 1.0):
            rope_scaling = llama3_rope_from_factors(factors, head_dim, theta, hints)

    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    fields: dict[str, Any] = dict(
        architecture=entry.name,
        vocab_size=tensor_torch_shape(tensors["token_embd.weight"])[0],
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        rms_norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        max_position_embeddings=int(field_value(reader, f"{arch}.context_length", 2048)),
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        rope_scaling=rope_scaling,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    try:
        fields = entry.gguf_config(lambda key, default=None: field_value(reader, f"{arch}.{key}", default), fields)
    except registry.Unsupported as exc:
        raise UnsupportedArchitectureError(
            f"{path}: {exc}, which thinkwise's {entry.name} implementation does not support"
        ) from exc
    return ModelConfig(**fields)


def ensure_gguf_path(path: Path) -> Path:
    """A .gguf file itself, or the single .gguf inside a directory."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".gguf" and p.is_file())
        if len(found) != 1:
            raise ModelFormatError(
                f"{path} contains {len(found)} .gguf files; pass the path of the one .gguf file to load"
                + (f" (found: {', '.join(p.name for p in found)})" if found else "")
            )
        return found[0]
    return path


def is_gguf_file(path: Path) -> bool:
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False

