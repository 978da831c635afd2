"""quantization="gguf": each layer keeps (about) the bits its GGUF tensor was stored with.

A GGUF mixes block types per tensor (the default model's Q4_K_M file: Q5_0 for most
projections, Q4_K / Q6_K for ffn_down, Q8_0 for the output). The GGUF's bytes are not
kernel-ready layouts, so each tensor is mapped to the nearest method that has kernels,
never to fewer bits than the file had: 4-bit block types (Q4_0, Q4_1, Q4_K, IQ4_*) and
the sub-4-bit ones become int4 with groups of 32 (the GGUF's own block width), 5- to
8-bit types (Q5_*, Q6_K, Q8_*) int8 per channel, and F32/F16/BF16 tensors stay 16-bit.
A fused layer (q/k/v, gate/up) takes the widest of its parts. The codes are re-derived
from the dequantized values, so int8 from Q5_0 is a re-rounding (measured, with its
perplexity, by benchmarks/quant_quality.py), not the file's bits. A block type not in
these lists fails with a ModelFormatError naming `quantization='gguf'`.
"""

from __future__ import annotations

from thinkwise.errors import ModelFormatError

FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS"}
BELOW_FOUR_BIT = {"Q2_K", "Q3_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0"}
EIGHT_BIT = {"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"}
SIXTEEN_BIT = {"F32", "F16", "BF16", "F64"}
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def bits_of(type_name: str, tensor: str) -> int:
    """The storage class (4, 8 or 16) a GGUF block type maps to."""
    if type_name in FOUR_BIT or type_name in BELOW_FOUR_BIT:
        return 4
    if type_name in EIGHT_BIT:
        return 8
    if type_name in SIXTEEN_BIT:
        return 16
    raise ModelFormatError(
        f"GGUF tensor {tensor!r} is stored as {type_name}, which quantization='gguf' has no kernel for; "
        "use quantization='int8' or 'int4' (requantize from the dequantized weights) or leave quantization unset.",
        param="quantization")


def gguf_tensor_types(source: str) -> dict[str, str]:
    """Hugging Face weight name -> GGUF block type name, read from the file's tensor table."""
    from pathlib import Path

    from thinkwise.loading.gguf_file import hf_name
    from thinkwise.loading.gguf_reading import field_value, open_gguf
    from thinkwise.models import registry

    reader = open_gguf(Path(source))
    entry = registry.for_gguf(field_value(reader, "general.architecture"), source)
    types = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, entry)
        if name is not None:
            types[name] = tensor.tensor_type.name
    return types


def source_tensors(module_name: str, types: dict[str, str]) -> list[str]:
    """The GGUF-backed Hugging Face weights a DispatchLinear was built from."""
    if module_name == "lm_head":
        return ["lm_head.weight" if "lm_head.weight" in types else "model.embed_tokens.weight"]
    prefix, _, leaf = module_name.rpartition(".")
    parts = FUSED_PARTS.get(leaf, (leaf,))
    return [f"model.{prefix}.{part}.weight" for part in parts]


def layer_bits(module_name: str, types: dict[str, str]) -> tuple[int, str]:
    """(bits to keep, the GGUF types it came from) for one layer."""
    names = source_tensors(module_name, types)
    missing = [n for n in names if n not in types]
    if missing:
        raise ModelFormatError(f"quantization='gguf': layer {module_name} has no GGUF tensor {missing[0]!r}",
                               param="quantization")
    found = [types[n] for n in names]
    return max(bits_of(t, n) for t, n in zip(found, names)), "+".join(dict.fromkeys(found))
