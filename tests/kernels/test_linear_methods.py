"""Linear methods (kernels/linear_methods): quantize-on-load, the CPU packed kernels against
the twin, per-layer choice and fallbacks, bad input, and a tiny model end to end."""

from __future__ import annotations

import pytest
import torch

from tests.logit_probes import prefill_logits
from tests.tiny_models import make_tiny_model
from thinkwise import LLM
from thinkwise.engine.config import EngineConfig
from thinkwise.errors import InvalidParameterError, ModelFormatError
from thinkwise.kernels.linear_dispatch import DispatchLinear
from thinkwise.kernels.linear_methods import METHODS, parse_quantization, quantize_model, quantized_cost_spec
from thinkwise.kernels.linear_methods.gguf import bits_of, layer_bits
from thinkwise.kernels.linear_methods.int4 import Int4Method
from thinkwise.kernels.linear_methods.int8 import Int8Method
from thinkwise.loading import load_model


def linear(out_features: int, in_features: int, dtype=torch.bfloat16, bias=False, seed=0) -> DispatchLinear:
    torch.manual_seed(seed)
    layer = DispatchLinear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features))
        if bias:
            layer.bias.copy_(torch.randn(out_features))
    return layer.to(dtype)


def rel_error(got, expected) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("method", [Int8Method(torch.bfloat16), Int4Method(torch.bfloat16, 32),
                                    Int4Method(torch.bfloat16, 64)], ids=lambda m: m.describe())
@pytest.mark.parametrize("shape", [(40, 128), (48, 64), (17, 64)])  # 40, 17: rows the int4 CPU packing pads
def test_cpu_kernel_matches_twin_and_the_16_bit_layer(method, shape):
    if shape[1] % getattr(method, "group", 1):
        return
    layer = linear(*shape, bias=True)
    weight = layer.weight.detach().clone()
    x = torch.randn(5, shape[1]).bfloat16()
    exact = torch.nn.functional.linear(x.float(), weight.float(), layer.bias.float())
    method.quantize(layer, layer.weight.detach())
    layer.method = method
    assert layer.weight is None and "weight" not in dict(layer.named_parameters())
    got = layer(x)
    assert got.shape == (5, shape[0]) and got.dtype == torch.bfloat16
    assert rel_error(got, method.reference(layer, x)) < 1e-2  # kernel vs twin: bf16 rounding only
    bound = 0.03 if isinstance(method, Int8Method) else 0.2  # vs the unquantized layer: rounding of W
    assert rel_error(got, exact) < bound
    assert rel_error(method.dequantize(layer), weight.float()) < bound
    stored_rows = -(-shape[0] // 16) * 16 if getattr(method, "blocked", False) else shape[0]  # tiles of 16 rows
    assert method.storage_bytes(layer) < stored_rows * shape[1] * 2


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_epilogue_runs_through_the_method(activation):
    from thinkwise.kernels.fused import gated_activation

    layer = linear(64, 32)
    quantize_model(torch.nn.ModuleDict({"mlp": layer}), "int8", dtype=torch.bfloat16)
    x = torch.randn(2, 32).bfloat16()
    assert torch.equal(layer.forward_gated(x, activation), gated_activation(layer(x), activation))


def test_parse_quantization_accepts_the_documented_names_and_refuses_others():
    assert parse_quantization(None) is None and parse_quantization("none") is None
    assert parse_quantization("int8").label == "int8"
    assert parse_quantization("int4").label == "int4-g32"
    assert parse_quantization("INT4-G128").label == "int4-g128"
    assert parse_quantization("gguf").kind == "gguf"
    assert parse_quantization("int4-all").label == "int4-all-g32" and parse_quantization("int4-all-g64").everywhere
    for bad in ("int3", "int4-g48", "fp8", "int4-g", "int4-all-all", "int4-g32-all", 8):
        with pytest.raises(InvalidParameterError, match="quantization") as error:
            parse_quantization(bad)
        assert error.value.param == "quantization"
    assert set(METHODS) == {"int8", "int4"}


def test_engine_config_validates_quantization_up_front():
    with pytest.raises(InvalidParameterError, match="int8, int4"):
        EngineConfig(quantization="q4")
    with pytest.raises(InvalidParameterError, match="LayerCast"):
        EngineConfig(quantization="int8", dtype="bfloat16", compute_dtype="float32")
    EngineConfig(quantization="int4-g64")


def test_cli_names_the_flag():
    from thinkwise.cli_checks import check_engine_options

    with pytest.raises(InvalidParameterError, match="--quantization"):
        check_engine_options({"quantization": "int2"})


def test_layers_a_method_cannot_hold_fall_back_to_int8_and_say_so():
    model = torch.nn.ModuleDict({"a": linear(32, 64), "b": linear(32, 96)})
    record = quantize_model(model, "int4-all-g64", dtype=torch.bfloat16)
    assert record["layers"] == {"a": "int4-g64", "b": "int8"}
    assert "not a multiple of the group size 64" in record["notes"]["b"]
    with pytest.raises(ModelFormatError, match="already quantized"):
        quantize_model(model, "int8", dtype=torch.bfloat16)


def test_gguf_needs_a_gguf_source_and_maps_block_types():
    with pytest.raises(InvalidParameterError, match="not loaded from a GGUF"):
        quantize_model(torch.nn.ModuleDict({"a": linear(16, 32)}), "gguf", dtype=torch.bfloat16)
    assert bits_of("Q4_K", "t") == 4 and bits_of("Q3_K", "t") == 4 and bits_of("Q5_0", "t") == 5
    assert bits_of("Q5_1", "t") == 8 and bits_of("Q6_K", "t") == 8
    assert bits_of("Q8_0", "t") == 8 and bits_of("F16", "t") == 16
    with pytest.raises(ModelFormatError, match="quantization='gguf' has no kernel"):
        bits_of("MXFP4_NEW", "blk.0.attn_q.weight")
    types = {"model.layers.0.self_attn.q_proj.weight": "Q5_0", "model.layers.0.self_attn.k_proj.weight": "Q4_K",
             "model.layers.0.self_attn.v_proj.weight": "Q8_0", "model.layers.0.mlp.down_proj.weight": "Q4_K",
             "model.embed_tokens.weight": "Q6_K"}
    assert layer_bits("layers.0.self_attn.qkv_proj", types) == (8, "Q5_0+Q4_K+Q8_0")  # the widest part
    assert layer_bits("layers.0.self_attn.q_proj", types) == (5, "Q5_0")
    assert layer_bits("layers.0.mlp.down_proj", types) == (4, "Q4_K")
    assert layer_bits("lm_head", types) == (8, "Q6_K")  # tied: the embedding's type
    with pytest.raises(ModelFormatError, match="no GGUF tensor"):
        layer_bits("layers.0.mlp.gate_up_proj", types)


# ----------------------------------------------------------------------------- a tiny model end to end


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-quant")
    make_tiny_model("qwen2", directory, seed=3, tie_word_embeddings=True)
    return directory


def engine_for(directory, quantization):
    loaded = load_model(str(directory), dtype=torch.bfloat16)
    return LLM.from_loaded(loaded, dtype="bfloat16", device="cpu", quantization=quantization, num_kv_blocks=32).engine


def close_logits(reference: torch.Tensor, got: torch.Tensor, bound: float) -> bool:
    return rel_error(got, reference) < bound


INT8_BOUND, INT4_BOUND = 0.05, 0.25  # random Gaussian weights: int8 ~1-2%, int4 g32 ~10-15% measured


def test_tiny_model_int8_and_int4_logits_track_bf16(tiny_dir):
    ids = list(range(5, 37))
    reference = prefill_logits(engine_for(tiny_dir, None), ids)
    int8 = engine_for(tiny_dir, "int8")
    assert close_logits(reference, prefill_logits(int8, ids), INT8_BOUND)
    record = int8.run_metadata["linear_methods"]
    assert record["method"] == "int8" and set(record["layers"].values()) == {"int8"}
    assert "lm_head" in record["layers"] and len(record["layers"]) == 1 + 4 * int8.model_config.num_layers
    int4 = engine_for(tiny_dir, "int4-all")
    assert close_logits(reference, prefill_logits(int4, ids), INT4_BOUND)
    assert int4.run_metadata["linear_methods"]["layers"]["lm_head"] == "int8"
    assert int4.run_metadata["linear_methods"]["counts"]["int4-g32"] == 4 * int4.model_config.num_layers
    mixed = engine_for(tiny_dir, "int4").run_metadata["linear_methods"]
    assert mixed["layers"]["layers.0.mlp.gate_up_proj"] == "int4-g32"
    assert mixed["layers"]["layers.0.self_attn.qkv_proj"] == "int8" and "attention" in mixed["notes"]["layers.1.self_attn.o_proj"]
    # The cost model charges the stored bytes: fewer under int8, fewer still under int4.
    bf16_bytes = engine_for(tiny_dir, None).cost_spec.body_weight_bytes
    assert int4.cost_spec.body_weight_bytes < int8.cost_spec.body_weight_bytes < bf16_bytes


def test_tied_embedding_is_untouched_and_generation_runs(tiny_dir):
    engine = engine_for(tiny_dir, "int8")
    model = engine.runner.model
    reference = load_model(str(tiny_dir), dtype=torch.bfloat16).weights["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight.detach(), reference)
    from thinkwise import SamplingParams

    request = engine.add_request(list(range(5, 15)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while not request.is_finished:
        engine.step()
    assert len(request.sequences[0].output_token_ids) == 6


def test_a_broken_scale_layout_fails_the_closeness_check(tiny_dir):
    """The checks above can fail: scales attached to the wrong rows (int8) or scale and zero
    swapped (int4 CPU layout) push the logits far outside the bounds."""
    ids = list(range(5, 37))
    reference = prefill_logits(engine_for(tiny_dir, None), ids)
    int8 = engine_for(tiny_dir, "int8")
    for module in int8.runner.model.modules():
        if isinstance(module, DispatchLinear):
            scales = module.block_scales if module.method.blocked else module.scales
            scales.copy_(scales.flip(0))
    assert not close_logits(reference, prefill_logits(int8, ids), INT8_BOUND)
    int4 = engine_for(tiny_dir, "int4-all")
    for module in int4.runner.model.modules():
        if isinstance(module, DispatchLinear) and getattr(module.method, "blocked", False) and \
                isinstance(module.method, Int4Method):
            scales = module.block_scales.clone()
            module.block_scales.copy_(module.block_offsets)
            module.block_offsets.copy_(scales)
        elif isinstance(module, DispatchLinear) and hasattr(module, "scales_zeros"):
            module.scales_zeros.copy_(module.scales_zeros.flip(-1))
    assert not close_logits(reference, prefill_logits(int4, ids), INT4_BOUND)


def test_quantized_cost_spec_leaves_16_bit_models_alone(tiny_dir):
    engine = engine_for(tiny_dir, None)
    assert quantized_cost_spec(engine.cost_spec, engine.runner.model) is engine.cost_spec
