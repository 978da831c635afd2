"""Linear methods: how each linear layer stores and multiplies its weight, chosen at load.

`METHODS` is the registry (name -> class); `parse_quantization` validates a user's
`quantization` value ("int8", "int4[-all][-g32|-g64|-g128]", "gguf", or None for the 16-bit
weights as loaded); `quantize_model` walks a built model's `DispatchLinear` layers after
their 16-bit weights are loaded and hands each the method chosen for it, returning the
per-layer record that goes into the run metadata. Rules, all stated in that record:
under int4 the output projection (lm_head) gets int8, since the logits are the layer most
sensitive to rounding (llama.cpp's Q4_K_M keeps it at 6-8 bits too), and so do the
attention projections unless "int4-all" is asked for (`INT4_KEEPS_INT8`); a layer a method
cannot hold (int4 with inputs not a multiple of the group) falls back to int8;
"gguf" follows the file's per-tensor block types (`gguf`). `quantized_cost_spec` makes
the cost model charge the bytes the layers really store. Adding a method is one module
with a `LinearMethod` subclass plus one line in `METHODS` (docs/extending_linear_methods.md).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from thinkwise.errors import InvalidParameterError, ModelFormatError
from thinkwise.kernels.linear_methods.base import LinearMethod
from thinkwise.kernels.linear_methods.int4 import DEFAULT_GROUP, GROUP_SIZES, Int4Method
from thinkwise.kernels.linear_methods.int5 import Int5Method
from thinkwise.kernels.linear_methods.int8 import Int8Method

__all__ = ["LinearMethod", "METHODS", "QUANTIZATION_CHOICES", "parse_quantization", "quantize_model",
           "quantized_cost_spec"]

METHODS: dict[str, type[LinearMethod]] = {"int8": Int8Method, "int4": Int4Method}
QUANTIZATION_CHOICES = ("int8", "int4", *(f"int4-g{g}" for g in GROUP_SIZES), "int4-all",
                        *(f"int4-all-g{g}" for g in GROUP_SIZES), "gguf")
_INT4 = re.compile(r"^int4(-all)?(?:-g(\d+))?$")
# Layers int4 leaves at int8 unless "-all": the attention projections. Measured on the default
# model (benchmarks/quant_quality.py, README text): RTN int4-g32 everywhere +4.1% perplexity,
# q/k/v at int8 +2.1%, q/k/v and o at int8 +0.8%, ffn_down at int8 +4.7% (no help); the
# attention projections are ~12% of a layer's weights, so the mix costs ~7% more bytes.
INT4_KEEPS_INT8 = ("qkv_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
    kind: str  # "int8", "int4" or "gguf"
    group: int = DEFAULT_GROUP
    everywhere: bool = False  # int4: also the attention projections

    @property
    def label(self) -> str:
        if self.kind != "int4":
            return self.kind
        return f"int4{'-all' if self.everywhere else ''}-g{self.group}"


def parse_quantization(value: str | None) -> QuantizationSpec | None:
    """The validated spec for a `quantization` value; None means the 16-bit weights as loaded."""
    if value is None or (isinstance(value, str) and value.lower() in ("", "none")):
        return None
    text = value.lower().strip() if isinstance(value, str) else ""
    if text in ("int8", "gguf"):
        return QuantizationSpec(text)
    if (match := _INT4.match(text)) and (match.group(2) is None or int(match.group(2)) in GROUP_SIZES):
        return QuantizationSpec("int4", int(match.group(2) or DEFAULT_GROUP), everywhere=bool(match.group(1)))
    raise InvalidParameterError(
        f"quantization {value!r} is not supported; choose one of {', '.join(QUANTIZATION_CHOICES)} "
        "or leave it unset for the 16-bit weights", param="quantization")


def _method_for(spec: QuantizationSpec, name: str, dtype: torch.dtype, gguf_types: dict[str, str] | None
                ) -> tuple[LinearMethod | None, str | None]:
    """(method or None for 16-bit, why this choice differs from the plain spec)."""
    if spec.kind == "int8":
        return Int8Method(dtype), None
    if spec.kind == "int4":
        if name == "lm_head":
            return Int8Method(dtype), "the output projection is kept at int8 under int4"
        if not spec.everywhere and name.rpartition(".")[2] in INT4_KEEPS_INT8:
            return Int8Method(dtype), "attention projections are kept at int8 under int4 (int4-all: int4 too)"
        return Int4Method(dtype, spec.group), None
    from thinkwise.kernels.linear_methods.gguf import layer_bits

    bits, types = layer_bits(name, gguf_types)
    method = {4: Int4Method(dtype, DEFAULT_GROUP), 5: Int5Method(dtype), 8: Int8Method(dtype), 16: None}[bits]
    return method, f"GGUF {types}"


def quantize_model(model: nn.Module, quantization: str | None, *, dtype: torch.dtype,
                   gguf_source: str | None = None) -> dict[str, Any]:
    """Give every DispatchLinear of `model` its method (see the module docstring) and return
    the record for the run metadata: the method, per-layer labels, counts and fallbacks."""
    from thinkwise.kernels.linear_dispatch import DispatchLinear

    spec = parse_quantization(quantization)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DispatchLinear)]
    sixteen = str(dtype).removeprefix("torch.")
    if spec is None:
        return {"method": None, "layers": {name: sixteen for name, _ in layers}}
    gguf_types = file_blocks = None
    if spec.kind == "gguf":
        if gguf_source is None:
            raise InvalidParameterError(
                "quantization='gguf' keeps a GGUF file's own block types, but this model was not loaded from a "
                "GGUF; use quantization='int8' or 'int4' to quantize 16-bit weights", param="quantization")
        from thinkwise.kernels.linear_methods.gguf import GgufBlocks

        file_blocks = GgufBlocks(gguf_source, getattr(model, "config", None))  # one reader for all layers
        gguf_types = file_blocks.types()
    per_layer: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name, layer in layers:
        if layer.method is not None:
            raise ModelFormatError(f"layer {name} is already quantized", param="quantization")
        method, note = _method_for(spec, name, dtype, gguf_types)
        if method is not None and (why := method.unsupported(layer)):
            note = f"{method.describe()} cannot hold it ({why}): int8 per channel instead"
            method = Int8Method(dtype)
        if note:
            notes[name] = note
        if method is None:
            per_layer[name] = sixteen
            continue
        with torch.no_grad():
            if spec.kind == "gguf" and _takes_blocks(method, layer):
                from thinkwise.kernels.linear_methods.gguf import keep_file_bits

                if not keep_file_bits(file_blocks, name, layer, method):
                    notes[name] = f"{notes[name]}: requantized to {method.describe()} (no kernel for its grid)"
            else:
                method.quantize(layer, layer.weight.detach())
        layer.method = method
        per_layer[name] = method.describe()
    release_freed_host_memory()
    record = {"method": spec.label, "layers": per_layer, "counts": dict(Counter(per_layer.values())), "notes": notes}
    if any(buffer.device.type == "cpu" for _, layer in layers if layer.method is not None
           for buffer in layer.buffers(recurse=False)):
        record["cpu_kernel"] = cpu_kernel_record()
    return record


def _takes_blocks(method: LinearMethod, layer) -> bool:
    """Whether `method` would hold `layer` in cpu_quant_gemm's blocks (so the GGUF's bytes fit)."""
    from thinkwise.kernels import cpu_quant_gemm

    if isinstance(method, Int5Method):
        return True  # `unsupported` already refused it where the kernel cannot run
    if isinstance(method, Int4Method) and method.group != cpu_quant_gemm.BLOCK:
        return False
    return (layer.weight.device.type == "cpu" and layer.in_features % cpu_quant_gemm.BLOCK == 0
            and cpu_quant_gemm.available())


def cpu_kernel_record() -> dict[str, str]:
    """Which kernel multiplies the quantized layers on the CPU, for the run metadata: ours
    (kernels/cpu_quant_gemm) or, where it cannot run here, PyTorch's, with the reason."""
    from thinkwise.kernels import cpu_quant_gemm

    status = cpu_quant_gemm.status()
    if status["available"]:
        isa = {"avx512_vnni": "AVX-512 VNNI", "avx2": "AVX2"}.get(status.get("isa"), status.get("isa"))
        mib = cpu_quant_gemm.weight_prefetch_mib()
        return {"kernel": f"thinkwise cpu_quant_gemm ({isa}, int8 activations per block of 32)",
                "weight_prefetch": f"{mib:g} MiB ahead between calls" if mib > 0 else
                "off (cpu_weight_prefetch_mib=0)"}
    return {"kernel": "pytorch", "why": status["reason"]}


def release_freed_host_memory() -> None:
    """Hand the freed 16-bit weights back to the OS (glibc keeps freed heap pages otherwise,
    so the resident size would not show the saving); a no-op where malloc_trim is absent."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantized_cost_spec(spec, model: nn.Module):
    """`spec` (a ModelCostSpec built for 16-bit weights) with the quantized layers' bytes as
    stored, so bytes-read accounting and roofline estimates follow the method."""
    from thinkwise.kernels.linear_dispatch import DispatchLinear

    body = head = stored = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, DispatchLinear) or layer.method is None:
            continue
        delta = layer.method.storage_bytes(layer) - layer.out_features * layer.in_features * spec.element_bytes
        if name == "lm_head":
            head += delta
            # A tied lm_head now has storage of its own next to the embedding table.
            stored += layer.method.storage_bytes(layer) if getattr(model.config, "tie_word_embeddings", False) else delta
        else:
            body += delta
            stored += delta
    if not (body or head or stored):
        return spec
    return dataclasses.replace(spec, body_weight_bytes=spec.body_weight_bytes + body,
                               lm_head_bytes=spec.lm_head_bytes + head, weight_bytes=spec.weight_bytes + stored)
