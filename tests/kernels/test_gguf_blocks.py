"""GGUF block bytes kept as the file stores them (kernels/linear_methods/gguf_blocks): each
converted type dequantizes to exactly what gguf-py's reference dequantizer gives, rows follow
the loader's order, other types fall back to requantizing, and the default model under
quantization="gguf" holds the file's bits in every layer it can."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from thinkwise.kernels import cpu_quant_gemm as qg
from thinkwise.kernels.linear_methods.gguf_blocks import NATIVE_BITS, natural, native_values, part_values


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid GGUF bytes for `type_name`: gguf-py's quantizer where it has one, else random
    bytes with finite fp16 super-block scales (every bit pattern of the rest is valid)."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[type_name]
    try:
        return quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), qtype)
    except NotImplementedError:
        block, size = {"Q4_K": (256, 144), "Q6_K": (256, 210)}[type_name]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        scale_at = {"Q4_K": (0, 2), "Q6_K": (208,)}[type_name]
        for at in scale_at:  # d (and dmin) as sane fp16 values
            raw[..., at:at + 2] = np.float16(rng.uniform(1e-3, 1e-2)).reshape(1).view(np.uint8)
        return raw.reshape(rows, -1)


def layout_weight(values, bits: int, cols: int) -> torch.Tensor:
    """The float32 weight the kernel will see for row-major `values` (through `layout`)."""
    packed = qg.layout(bits, *values)
    return qg.dequantize(packed[0], packed[1], packed[2] if bits == 4 else None, cols, values[0].shape[0], bits)


@pytest.mark.parametrize("type_name,cols", [("Q8_0", 96), ("Q5_0", 96), ("Q4_0", 160), ("Q4_1", 64), ("Q4_K", 512)])
def test_kept_blocks_dequantize_to_the_files_values(type_name, cols):
    rows = 7
    raw = random_blocks(type_name, rows, cols, seed=cols)
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).astype(np.float32))
    bits, codes, scales, offsets = native_values(type_name, raw, rows, cols)
    assert bits == NATIVE_BITS[type_name]
    got = layout_weight(natural(codes, scales, offsets), bits, cols)
    if type_name == "Q4_K":  # d * sc and dmin * m rounded to fp16 once each
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
    else:
        assert torch.equal(got, expected)


def test_q5_0_in_an_8_bit_layer_moves_exactly_and_rows_follow_the_loader():
    rows, cols = 6, 64
    raw = random_blocks("Q5_0", rows, cols, seed=1)
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q5_0).reshape(rows, cols).astype(np.float32))
    order = np.array([3, 0, 5, 1, 2, 4])
    values, kept = part_values("Q5_0", raw, rows, cols, 8, order, lambda: pytest.fail("no fallback expected"))
    assert kept and torch.equal(layout_weight(values, 8, cols), expected[order])


def test_other_types_and_changed_values_fall_back_to_requantizing():
    rows, cols = 4, 256
    raw = random_blocks("Q6_K", rows, cols, seed=2)
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q6_K).reshape(rows, cols).astype(np.float32))
    values, kept = part_values("Q6_K", raw, rows, cols, 8, None, lambda: expected)
    assert not kept
    got = layout_weight(values, 8, cols)
    assert ((got - expected).norm() / expected.norm()).item() < 0.01
    q8 = random_blocks("Q8_0", rows, cols, seed=3)
    values, kept = part_values("Q8_0", q8, rows, cols, 8, False, lambda: torch.zeros(rows, cols))
    assert not kept and torch.equal(layout_weight(values, 8, cols), torch.zeros(rows, cols))


@pytest.mark.slow
@pytest.mark.skipif(not qg.available(), reason="CPU kernel unavailable")
def test_default_model_under_gguf_keeps_the_files_bits():
    from thinkwise import LLM
    from thinkwise.kernels.linear_dispatch import DispatchLinear
    from thinkwise.loading import load_model

    loaded = load_model("default")
    reference = {name: tensor.clone() for name, tensor in loaded.weights.items()
                 if "layers.3." in name or name == "lm_head.weight"}
    llm = LLM.from_loaded(loaded, dtype="bfloat16", device="cpu", quantization="gguf", num_kv_blocks=16)
    record = llm.engine.run_metadata["linear_methods"]
    assert record["counts"] == {"int8": 25, "int5-g32": 60, "int4-g32": 12}
    requantized = [name for name, note in record["notes"].items() if "requantized" in note]
    assert requantized and all("Q6_K" in record["notes"][name] for name in requantized)
    model = llm.engine.runner.model
    layers = dict(model.named_modules())
    q, k, v = (reference[f"model.layers.3.self_attn.{p}_proj.weight"] for p in "qkv")
    pairs = {"layers.3.self_attn.qkv_proj": torch.cat([q, k, v]), "lm_head": reference["lm_head.weight"],
             "layers.3.mlp.gate_up_proj": torch.cat([reference["model.layers.3.mlp.gate_proj.weight"],
                                                     reference["model.layers.3.mlp.up_proj.weight"]])}
    for name, weight in pairs.items():
        layer = layers[name]
        assert isinstance(layer, DispatchLinear) and layer.method.blocked
        # The file's values, rounded to bf16 once by the 16-bit loader.
        torch.testing.assert_close(layer.method.dequantize(layer).bfloat16(), weight, rtol=0, atol=0)
