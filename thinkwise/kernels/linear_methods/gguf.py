"""quantization="gguf": each layer keeps (about) the bits its GGUF tensor was stored with.

A GGUF mixes block types per tensor (the default model's Q4_K_M file: Q5_0 for most
projections, Q4_K / Q6_K for ffn_down, Q8_0 for the output). The GGUF's bytes are not
kernel-ready layouts, so each tensor is mapped to the nearest method that has kernels,
never to fewer bits than the file had: 4-bit block types (Q4_0, Q4_1, Q4_K, IQ4_*) and
the sub-4-bit ones become int4 with groups of 32 (the GGUF's own block width), 5- to
8-bit types (Q5_*, Q6_K, Q8_*) int8 per channel, and F32/F16/BF16 tensors stay 16-bit.
A fused layer (q/k/v, gate/up) takes the widest of its parts. On the CPU kernel
(`cpu_quant_gemm`) Q5_0 has a 5-bit layout of its own and the layers keep the file's bits
where the grids agree (`keep_file_bits`, `gguf_blocks`: Q8_0, Q5_0, Q4_0, Q4_1, Q4_K),
requantizing only the other types (Q6_K -> int8 blocks of 32); elsewhere the codes are
re-derived from the dequantized values (Q5_0 -> int8 per channel, a re-rounding measured by
benchmarks/quant_quality.py). A block type not in these lists fails with a ModelFormatError
naming `quantization='gguf'`.
"""

from __future__ import annotations

from thinkwise.errors import ModelFormatError

FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS"}
BELOW_FOUR_BIT = {"Q2_K", "Q3_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0"}
FIVE_BIT = {"Q5_0"}  # 5-bit blocks on the CPU kernel (Int5Method), int8 elsewhere
EIGHT_BIT = {"Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"}
SIXTEEN_BIT = {"F32", "F16", "BF16", "F64"}
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def bits_of(type_name: str, tensor: str) -> int:
    """The storage class (4, 5, 8 or 16) a GGUF block type maps to."""
    if type_name in FOUR_BIT or type_name in BELOW_FOUR_BIT:
        return 4
    if type_name in FIVE_BIT:
        return 5
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
    return GgufBlocks(source).types()


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


class GgufBlocks:
    """The open GGUF behind a model: its tensor table by Hugging Face name, and what
    `keep_file_bits` reads (one reader for the block types and every layer's bytes). `config`
    (the model's) is needed only for `row_order` and `dequantized`."""

    def __init__(self, source: str, config=None):
        from pathlib import Path

        from thinkwise.loading.gguf_file import hf_name
        from thinkwise.loading.gguf_reading import field_value, open_gguf
        from thinkwise.models import registry

        self.reader = open_gguf(Path(source))
        self.entry = registry.for_gguf(field_value(self.reader, "general.architecture"), source)
        self.config = config
        self.tensors = {}
        for tensor in self.reader.tensors:
            name = hf_name(tensor.name, self.entry)
            if name is not None:
                self.tensors[name] = tensor

    def types(self) -> dict[str, str]:
        """Hugging Face weight name -> GGUF block type name."""
        return {name: tensor.tensor_type.name for name, tensor in self.tensors.items()}

    def row_order(self, name: str, rows: int):
        """None if the loader keeps the file's row order, the order it puts rows in, or False
        if it changes the values themselves (then the file's bits cannot be kept)."""
        import numpy as np

        probe = np.arange(rows, dtype=np.float64)[:, None]
        try:
            moved = np.asarray(self.entry.gguf_tensor(name, probe, self.config))
        except Exception:  # a transform that needs the real width: not a row permutation we know
            return False
        if moved.shape != (rows, 1) or not np.array_equal(np.sort(moved[:, 0]), probe[:, 0]):
            return False
        order = moved[:, 0].astype(np.int64)
        return None if np.array_equal(order, np.arange(rows)) else order

    def dequantized(self, name: str):
        import numpy as np
        import torch
        from gguf.quants import dequantize

        from thinkwise.loading.gguf_reading import tensor_torch_shape

        tensor = self.tensors[name]
        array = dequantize(tensor.data, tensor.tensor_type).reshape(tensor_torch_shape(tensor))
        array = self.entry.gguf_tensor(name, array, self.config)
        return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def keep_file_bits(blocks: GgufBlocks, module_name: str, layer, method) -> bool:
    """Give `layer` (a DispatchLinear still holding its 16-bit weight) `method`'s blocked
    layout built from the GGUF's own bytes (`gguf_blocks`); True if every part kept the
    file's bits, False if some part was requantized (a type without the same grid)."""
    import torch

    from thinkwise.kernels.cpu_quant_gemm import layout
    from thinkwise.kernels.linear_methods.gguf_blocks import part_values
    from thinkwise.loading.gguf_reading import tensor_torch_shape

    names = source_tensors(module_name, {name: "" for name in blocks.tensors})
    parts, kept = [], True
    for name in names:
        tensor = blocks.tensors[name]
        rows, cols = tensor_torch_shape(tensor)
        values, native = part_values(tensor.tensor_type.name, tensor.data, rows, cols, method.bits,
                                     blocks.row_order(name, rows), lambda n=name: blocks.dequantized(n))
        parts.append(values)
        kept = kept and native
    merged = [torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0] for pieces in zip(*parts)]
    if merged[0].shape != (layer.out_features, layer.in_features):
        raise ModelFormatError(f"quantization='gguf': the GGUF tensors of {module_name} make a "
                               f"{tuple(merged[0].shape)} weight, the layer is "
                               f"{(layer.out_features, layer.in_features)}", param="quantization")
    method.keep_blocks(layer, *layout(method.bits, *merged))
    return kept
