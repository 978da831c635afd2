"""The quantized CPU GEMM (kernels/cpu_quant_gemm + csrc/cpu_quant_gemm.cpp), each build this CPU
runs (AVX-512 VNNI, AVX2), against its PyTorch twin on small and odd shapes and on the codes and
activations at the ends of their ranges (where the AVX2 build's int16 sums could saturate), its
packing, the choice of build and its fallback, and greedy decoding of a tiny model through the
kernel equal to decoding through the twin."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import make_tiny_model
from thinkwise import LLM, SamplingParams
from thinkwise.kernels import cpu_quant_gemm as qg
from thinkwise.kernels.linear_dispatch import DispatchLinear
from thinkwise.kernels.linear_methods import quantize_model
from thinkwise.loading import load_model

needs_kernel = pytest.mark.skipif(not qg.available(), reason=f"kernel unavailable: {qg.status()['reason']}")


def built_variants() -> list:
    """One param per build of the kernel this CPU runs: its operator (each registers its own namespace)."""
    out = []
    for isa, namespace, library in qg._library.variants:
        if library.load()["available"]:
            out.append(pytest.param(getattr(torch.ops, namespace).quant_linear.default, id=isa))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason=f"no build runs here: {qg.status()['reason']}"))]


VARIANTS = built_variants()


def packed(weight: torch.Tensor, bits: int):
    if bits == 4:
        return qg.pack_int4(weight)
    return (*(qg.pack_int5 if bits == 5 else qg.pack_int8)(weight), None)


@pytest.mark.parametrize("op", VARIANTS)
@pytest.mark.parametrize("bits", [8, 5, 4])
@pytest.mark.parametrize("n,k", [(1, 32), (5, 96), (17, 64), (37, 896), (130, 160)])  # N % 16 != 0: padded tiles
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17])  # tile remainders (4 and 8 rows a pass), two + 1
def test_kernel_equals_the_twin_in_float32(op, bits, n, k, rows):
    torch.manual_seed(n * 1000 + k + rows)
    weight = torch.randn(n, k) * 0.05
    codes, scales, offsets = packed(weight, bits)
    x = torch.randn(rows, k) * 3
    bias = torch.randn(n)
    for b in (None, bias):
        got = op(x, codes, scales, offsets, b, k, n, bits)
        twin = qg.reference_linear(x, codes, scales, offsets, b, k, n, bits)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        # Same products, another summation order: float32 rounding only.
        torch.testing.assert_close(got, twin, rtol=1e-5, atol=1e-5 * twin.abs().max().item())


@pytest.mark.parametrize("op", VARIANTS)
@pytest.mark.parametrize("bits", [8, 5, 4])
def test_bfloat16_activations_and_output(op, bits):
    torch.manual_seed(1)
    weight = torch.randn(72, 128)
    codes, scales, offsets = packed(weight, bits)
    x = torch.randn(6, 128).bfloat16()
    bias = torch.randn(72).bfloat16()
    got = op(x, codes, scales, offsets, bias, 128, 72, bits)
    assert got.dtype == torch.bfloat16
    twin = qg.reference_linear(x, codes, scales, offsets, bias, 128, 72, bits)
    torch.testing.assert_close(got.float(), twin.float(), rtol=2 ** -7, atol=1e-2)  # one bf16 rounding apart
    exact = torch.nn.functional.linear(x.float(), weight, bias.float())
    bound = {8: 0.02, 5: 0.08, 4: 0.12}[bits]  # weight + activation rounding, measured ~0.8% / ~4% / ~8%
    assert ((got.float() - exact).norm() / exact.norm()).item() < bound


@pytest.mark.parametrize("op", VARIANTS)
@pytest.mark.parametrize("bits", [8, 5, 4])
@pytest.mark.parametrize("code", ["lowest", "highest"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_codes_and_activations_at_the_ends_of_their_ranges(op, bits, code, sign):
    """Every code at its smallest or largest value (8-bit code 0 too, GGUF Q8_0's -128) times
    activations that all quantize to +-127: the largest dot products a block can have, where an
    int16 sum of the AVX2 build would saturate or wrap if its bounds were wrong."""
    top = {8: 255, 5: 31, 4: 15}[bits]
    values = torch.full((20, 128), 0 if code == "lowest" else top, dtype=torch.uint8)
    values[3, ::3] = top - values[3, ::3]  # one row mixed, both ends
    scales = torch.full((20, 4), 0.5, dtype=torch.float16)
    offsets = torch.full((20, 4), -2.0, dtype=torch.float16) if bits == 4 else None
    stored = qg.layout(bits, values, scales, offsets)
    codes, block_scales, block_offsets = (*stored, None) if bits != 4 else stored
    for x in (torch.full((3, 128), sign), torch.full((3, 128), sign).bfloat16()):
        got = op(x, codes, block_scales, block_offsets, None, 128, 20, bits)
        twin = qg.reference_linear(x, codes, block_scales, block_offsets, None, 128, 20, bits)
        assert twin.abs().max() > 0
        torch.testing.assert_close(got.float(), twin.float(), rtol=1e-5 if x.dtype == torch.float32 else 2 ** -7,
                                   atol=1e-3)


def test_the_best_build_this_cpu_runs_is_chosen_and_can_be_forced(monkeypatch, caplog):
    class Fake:
        def __init__(self, reason=None):
            self.reason = reason

        def load(self):
            return {"available": False, "reason": self.reason} if self.reason else {"available": True,
                                                                                     "reason": "built"}

    from thinkwise.kernels.cpu_build import LibraryVariants

    def variants(first_reason=None):
        return LibraryVariants([("avx512_vnni", "ns512", Fake(first_reason)), ("avx2", "ns2", Fake())], "TW_TEST_ENV")

    monkeypatch.delenv("TW_TEST_ENV", raising=False)
    assert variants().load() == {"available": True, "reason": "built", "isa": "avx512_vnni", "namespace": "ns512"}
    assert variants("this CPU lacks avx512f").load()["isa"] == "avx2"  # the next best
    monkeypatch.setenv("TW_TEST_ENV", "avx2")  # forced, though the better one runs
    assert variants().load()["namespace"] == "ns2"
    monkeypatch.setenv("TW_TEST_ENV", "0")
    assert variants().load() == {"available": False, "reason": "disabled by TW_TEST_ENV=0"}
    monkeypatch.setenv("TW_TEST_ENV", "avx1024")
    refused = variants().load()
    assert not refused["available"] and "'avx1024' is none of 0, 1, avx512_vnni, avx2" in refused["reason"]
    assert "TW_TEST_ENV='avx1024' is none of" in caplog.text  # said at once, not only in the metadata
    monkeypatch.setenv("TW_TEST_ENV", "1")
    none = LibraryVariants([("a", "x", Fake("no a")), ("b", "y", Fake("no b"))], "TW_TEST_ENV").load()
    assert none == {"available": False, "reason": "a: no a; b: no b"}  # every reason, for the run metadata


@needs_kernel
def test_the_record_names_the_build_in_use():
    from thinkwise.kernels.linear_methods import cpu_kernel_record

    isa = {"avx512_vnni": "AVX-512 VNNI", "avx2": "AVX2"}[qg.status()["isa"]]
    previous = qg.weight_prefetch_mib()
    try:
        qg.set_weight_prefetch(4)
        assert cpu_kernel_record() == {"kernel": f"thinkwise cpu_quant_gemm ({isa}, int8 activations per block of 32)",
                                       "weight_prefetch": "4 MiB ahead between calls"}
        qg.set_weight_prefetch(0)
        assert cpu_kernel_record()["weight_prefetch"] == "off (cpu_weight_prefetch_mib=0)"
        for bad in (-1, float("nan")):
            with pytest.raises(ValueError, match="takes 0 .off. to 65536 MiB"):
                qg.set_weight_prefetch(bad)
        with pytest.raises(RuntimeError, match="bytes must be >= 0"):  # the operator checks too
            getattr(torch.ops, qg.status()["namespace"]).set_weight_prefetch(-5)
    finally:
        qg.set_weight_prefetch(previous)


def test_packing_round_trips_values_the_format_can_hold():
    """A block of q * s (s an fp16, max |q| = 127) is stored exactly, as GGUF Q8_0 is; 5-bit
    (Q5_0) and 4-bit blocks c * s + o (Q4_1) likewise; padding rows to 16 is sliced off."""
    torch.manual_seed(2)
    s = torch.rand(3, 3).mul(0.01).to(torch.float16)
    q = torch.randint(-127, 128, (3, 3, 32)).float()
    q[..., 0] = 127
    weight = (q * s.float()[..., None]).reshape(3, 96)
    codes, scales = qg.pack_int8(weight)
    assert codes.shape == (1, 3 * 512) and scales.shape == (1, 3 * 16)
    assert torch.equal(qg.dequantize(codes, scales, None, 96, 3, 8), weight)
    q5 = torch.randint(-15, 16, (3, 3, 32)).float()  # max |q| = 15 sets the scale
    q5[..., 0] = 15
    weight5 = (q5 * s.float()[..., None]).reshape(3, 96)
    codes5, scales5 = qg.pack_int5(weight5)
    assert codes5.shape == (1, 3 * 320) and torch.equal(qg.dequantize(codes5, scales5, None, 96, 3, 5), weight5)
    c = torch.randint(0, 16, (3, 3, 32)).float()
    c[..., 0], c[..., 1] = 0, 15
    o = (torch.rand(3, 3) - 0.5).to(torch.float16)
    weight4 = (c * s.float()[..., None] + o.float()[..., None]).reshape(3, 96)
    codes4, scales4, offsets4 = qg.pack_int4(weight4)
    assert codes4.shape == (1, 3 * 256)
    assert torch.allclose(qg.dequantize(codes4, scales4, offsets4, 96, 3, 4), weight4, atol=1e-6)
    for bits, top in ((8, 256), (5, 32), (4, 16)):  # layout and unlayout are inverses, 35 rows: 3 tiles
        values = torch.randint(0, top, (35, 64), dtype=torch.uint8)
        block_scales = torch.rand(35, 2).to(torch.float16)
        offsets = torch.rand(35, 2).to(torch.float16) if bits == 4 else None
        packed = qg.layout(bits, values, block_scales, offsets)
        back = qg.unlayout(bits, packed[0], packed[1], offsets if offsets is None else packed[2], 35)
        assert torch.equal(back[0], values) and torch.equal(back[1], block_scales)
        assert bits != 4 or torch.equal(back[2], offsets)


def test_the_interleaved_layout_byte_by_byte():
    """Where csrc/cpu_quant_gemm.cpp reads each code: 8-bit step s, lane l, byte q at
    64 s + 4 l + q; 4-bit nibbles of steps t and t + 4 share byte 64 t + 4 l + q; the fifth
    bits are 64 bit planes after the 256 nibble bytes, bit s of plane byte 4 l + q."""
    values = torch.zeros(16, 32, dtype=torch.uint8)
    values[3, 4 * 2 + 1] = 200  # lane 3, step 2, q 1
    codes8, _ = qg.layout(8, values, torch.ones(16, 1, dtype=torch.float16))
    assert codes8[0, 64 * 2 + 4 * 3 + 1] == 200 and codes8.sum() == 200
    values = torch.zeros(16, 32, dtype=torch.uint8)
    values[5, 4 * 6 + 2] = 0x1B  # lane 5, step 6 (high nibble of t = 2), q 2, fifth bit set
    codes5, _ = qg.layout(5, values, torch.ones(16, 1, dtype=torch.float16))
    assert codes5[0, 64 * 2 + 4 * 5 + 2] == 0xB0 and codes5[0, :256].sum() == 0xB0
    planes = codes5[0, 256:]
    assert planes[4 * 5 + 2] == 1 << 6 and planes.sum() == planes[4 * 5 + 2]
    scales = torch.arange(32, dtype=torch.float16).reshape(16, 2)
    _, per_block = qg.layout(8, torch.zeros(16, 64, dtype=torch.uint8), scales)
    assert per_block[0, 16 + 7] == scales[7, 1]  # block 1, lane 7


@needs_kernel
def test_zero_weights_and_zero_activations_give_the_bias_not_nan():
    codes, scales = qg.pack_int8(torch.zeros(8, 64))
    bias = torch.arange(8.0)
    x = torch.zeros(2, 64)
    assert torch.equal(qg.quant_linear(x, codes, scales, None, bias, 64, 8, 8), bias.expand(2, 8))
    codes4, scales4, offsets4 = qg.pack_int4(torch.randn(8, 64))
    assert torch.equal(qg.quant_linear(x, codes4, scales4, offsets4, bias, 64, 8, 4), bias.expand(2, 8))
    codes5, scales5 = qg.pack_int5(torch.randn(8, 64))
    assert torch.equal(qg.quant_linear(x, codes5, scales5, None, bias, 64, 8, 5), bias.expand(2, 8))
    assert qg.quant_linear(torch.zeros(0, 64), codes, scales, None, None, 64, 8, 8).shape == (0, 8)


@needs_kernel
def test_bad_inputs_are_refused_with_the_reason():
    codes, scales = qg.pack_int8(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="x has 32 columns"):
        qg.quant_linear(torch.randn(1, 32), codes, scales, None, None, 64, 8, 8)
    with pytest.raises(RuntimeError, match=r"8-bit codes for 8x128 must be contiguous uint8 \[1, 2048\]"):
        qg.quant_linear(torch.randn(1, 128), codes, scales, None, None, 128, 8, 8)
    with pytest.raises(RuntimeError, match="codes for 17x64"):  # 17 rows need two tiles
        qg.quant_linear(torch.randn(1, 64), codes, scales, None, None, 64, 17, 8)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        qg.quant_linear(torch.randn(1, 64).half(), codes, scales, None, None, 64, 8, 8)
    with pytest.raises(RuntimeError, match="fp16 offsets"):
        qg.quant_linear(torch.randn(1, 64), codes[:, :512].contiguous(), scales, None, None, 64, 8, 4)
    with pytest.raises(RuntimeError, match="scales must be"):
        qg.quant_linear(torch.randn(1, 64), codes, scales.float(), None, None, 64, 8, 8)
    with pytest.raises(RuntimeError, match="bits must be 4, 5 or 8"):
        qg.quant_linear(torch.randn(1, 64), codes, scales, None, None, 64, 8, 6)
    with pytest.raises(RuntimeError, match="5-bit codes"):
        qg.quant_linear(torch.randn(1, 64), codes, scales, None, None, 64, 8, 5)
    with pytest.raises(RuntimeError, match="bias must be"):
        qg.quant_linear(torch.randn(1, 64), codes, scales, None, torch.zeros(9), 64, 8, 8)
    with pytest.raises(ValueError, match="group 48"):
        qg.pack_int4(torch.randn(4, 96), 48)


def test_without_the_kernel_the_methods_fall_back_and_the_record_says_why(monkeypatch):
    monkeypatch.setattr(qg._library, "_status", {"available": False, "reason": "this CPU lacks avx512_vnni"})
    model = torch.nn.ModuleDict({"a": DispatchLinear(64, 32, bias=False), "b": DispatchLinear(64, 32, bias=False)})
    for layer in model.values():
        torch.nn.init.normal_(layer.weight)
    record = quantize_model(model.to(torch.bfloat16), "int4-all", dtype=torch.bfloat16)
    assert record["cpu_kernel"] == {"kernel": "pytorch", "why": "this CPU lacks avx512_vnni"}
    assert not model["a"].method.blocked and hasattr(model["a"], "packed")
    x = torch.randn(3, 64).bfloat16()
    layer = model["a"]
    assert torch.allclose(layer(x).float(), layer.method.reference(layer, x).float(), rtol=0.02, atol=0.05)


def test_disabling_by_environment_is_reported(monkeypatch):
    monkeypatch.setenv(qg.DISABLE_ENV, "0")
    assert qg._load() == {"available": False, "reason": f"disabled by {qg.DISABLE_ENV}=0"}


# ----------------------------------------------------------------------------- a tiny model


class TwinLinear:
    """Replaces a blocked method's kernel call by the PyTorch twin (same inputs, same signature)."""

    def __init__(self, method):
        self.method = method

    def __call__(self, layer, x):
        bits = self.method.bits
        out = qg.reference_linear(x.reshape(-1, layer.in_features), layer.codes, layer.block_scales,
                                  getattr(layer, "block_offsets", None), layer.bias, layer.in_features,
                                  layer.out_features, bits)
        return out.reshape(*x.shape[:-1], layer.out_features)


@needs_kernel
@pytest.mark.parametrize("quantization", ["int8", "int4-all"])
def test_greedy_decoding_through_the_kernel_equals_the_twin(tmp_path, quantization):
    make_tiny_model("qwen2", tmp_path, seed=5, tie_word_embeddings=True)

    def greedy(twin: bool) -> list[int]:
        llm = LLM.from_loaded(load_model(str(tmp_path), dtype=torch.float32), dtype="float32", device="cpu",
                              quantization=quantization, num_kv_blocks=32)
        model = llm.engine.runner.model
        layers = [m for m in model.modules() if isinstance(m, DispatchLinear)]
        assert layers and all(m.method.blocked for m in layers)
        if twin:
            for m in layers:
                m.method.apply = TwinLinear(m.method)  # an instance attribute: called as apply(layer, x)
        out = llm.generate({"prompt_token_ids": list(range(5, 25))},
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        return list(out[0].outputs[0].token_ids)

    assert greedy(False) == greedy(True)


@needs_kernel
def test_threads_and_a_forked_child_give_the_same_result():
    """The tile pool shares a call between threads; a forked child (no helper threads) must
    compute the same bits alone, not hang on state its parent's helpers held."""
    import os
    import signal

    torch.manual_seed(4)
    codes, scales = qg.pack_int8(torch.randn(4096, 256))
    x = torch.randn(3, 256)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = qg.quant_linear(x, codes, scales, None, None, 256, 4096, 8)
        torch.set_num_threads(2)
        shared = qg.quant_linear(x, codes, scales, None, None, 256, 4096, 8)
        assert torch.equal(alone, shared)  # each tile is computed by one thread: same bits
        pid = os.fork()
        if pid == 0:  # the child: a hang is killed by the alarm and fails the exit code
            signal.alarm(30)
            same = torch.equal(qg.quant_linear(x, codes, scales, None, None, 256, 4096, 8), alone)
            os._exit(0 if same else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        torch.set_num_threads(previous)


@needs_kernel
def test_prefetching_the_next_layer_changes_no_result_even_after_the_layers_are_freed():
    """With 2 threads the helpers prefetch the layers that followed the current one last time
    (learned from the call order, keyed by the codes' address), up to a budget. Layers called
    in a cycle, then freed and replaced by others that may reuse their memory and run in
    another order, give exactly the single-threaded bits (a stale entry may only prefetch the
    wrong range), with the whole cycle in the budget, a budget ending inside a layer, or none."""
    previous, previous_mib = torch.get_num_threads(), qg.weight_prefetch_mib()
    try:
        for generation, mib in enumerate((4, 0.01, 0)):  # a budget ending inside a layer; off
            qg.set_weight_prefetch(mib)
            torch.manual_seed(generation)
            layers = [(bits, *packed(torch.randn(n, 256) * 0.05, bits), n)
                      for bits, n in ((8, 512), (5, 1152), (4, 896), (8, 2048))]
            x = torch.randn(2, 256)
            torch.set_num_threads(1)
            alone = [qg.quant_linear(x, c, s, o, None, 256, n, bits) for bits, c, s, o, n in layers]
            torch.set_num_threads(2)
            order = list(range(len(layers))) * 3
            if generation == 1:
                order.reverse()
            for i in order:
                bits, c, s, o, n = layers[i]
                assert torch.equal(qg.quant_linear(x, c, s, o, None, 256, n, bits), alone[i])
            del layers, alone
    finally:
        torch.set_num_threads(previous)
        qg.set_weight_prefetch(previous_mib)
