"""The CPU GEMM dispatcher: profiled switch points, and a preset table that pins them."""

from __future__ import annotations

import torch

from thinkwise.kernels.linear_dispatch import DispatchLinear, GpuLinearDispatcher, LinearDispatcher


def model(*shapes):
    layers = torch.nn.ModuleList(DispatchLinear(i, o, bias=False) for o, i in shapes)
    for layer in layers:
        torch.nn.init.normal_(layer.weight)
    return layers


def test_profile_sets_a_switch_per_shape_and_describes_it():
    layers = model((64, 32), (64, 32), (16, 64))
    dispatcher = LinearDispatcher()
    dispatcher.profile(layers, torch.float32)
    assert set(dispatcher.describe()) == {"64x32", "16x64"}
    assert layers[0].blas_from_rows == layers[1].blas_from_rows == dispatcher.table[(64, 32)]


def test_preset_table_pins_switch_points_without_timing(monkeypatch):
    layers = model((64, 32), (16, 64))
    monkeypatch.setattr(LinearDispatcher, "_time", staticmethod(lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("a preset shape must not be timed"))))
    dispatcher = LinearDispatcher()
    dispatcher.profile(layers, torch.float32, preset={"64x32": 4, "16x64": None})
    assert dispatcher.describe() == {"64x32": 4, "16x64": None}
    assert layers[0].blas_from_rows == 4 and layers[0].blas_weight is not None
    assert layers[1].blas_from_rows is None
    x = torch.randn(5, 32)
    torch.testing.assert_close(layers[0](x), x @ layers[0].weight.T, rtol=1e-5, atol=1e-5)  # BLAS path, 5 >= 4


def test_a_quantized_tiling_that_cannot_be_built_or_computes_wrong_is_skipped_and_reported(monkeypatch):
    """The start-up profile of a quantized shape survives a tiling that fails to build on this
    GPU/Triton (here: one that raises) and leaves out one whose result is wrong: the others are
    still timed and chosen from, and the table's timings say which failed and why. Runs the profile on CPU with a stand-in timer."""
    import os

    import pytest

    from thinkwise.kernels import linear_dispatch
    from thinkwise.kernels import triton_quant_gemm as tq
    from thinkwise.kernels.linear_dispatch import GpuLinearDispatcher
    from thinkwise.kernels.linear_methods.int8 import quantize_int8
    from thinkwise.kernels.linear_methods.plans import quant_candidates

    if not tq.HAVE_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton under TRITON_INTERPRET=1 (the test suite's conftest sets it)")
    layer = DispatchLinear(64, 32, bias=False)
    markers = [tq.QuantGemmConfig(block_n=1, block_k=4), tq.QuantGemmConfig(block_n=2, block_k=4)]
    q, scales = quantize_int8(torch.randn(32, 64), torch.float32)

    class Method:
        def describe(self):
            return "int8"

        def storage_bytes(self, layer):
            return q.numel() + 4 * scales.numel()

        def reference(self, layer, x):
            used_reference.append(True)
            return tq.quant_gemm_reference(x, q, scales, None, None, 64)

        def gpu_candidates(self, layer, rows):
            offered = quant_candidates(layer, rows, q, scales, None, 64)

            def broken(x):
                raise RuntimeError("out of resource: shared memory\nmore detail")

            offered["triton:broken"] = (markers[0], broken)
            offered["triton:wrong"] = (markers[1], lambda x: torch.zeros(x.shape[0], 32))
            return offered

    layer.method = Method()
    used_reference = []

    def fake_timer(calls, replays=5):  # runs every call once (as the real one's warm-up does); Triton wins
        used_reference.clear()
        for call in calls:
            call()
        return 10.0 if used_reference else 5.0

    monkeypatch.setattr(linear_dispatch, "cuda_graph_time_us", fake_timer)
    dispatcher = GpuLinearDispatcher(rows=(1, 2))
    dispatcher._profile_quantized("int8:32x64", [layer], 1 << 20, torch.float32, torch.device("cpu"))
    timings = dispatcher.timings_us["int8:32x64"]
    assert timings["failed"] == {"triton:broken": "RuntimeError: out of resource: shared memory",
                                 "triton:wrong": "wrong result (relative error 1 against the twin)"}
    assert "triton:broken" not in timings and "triton:wrong" not in timings
    chosen = dispatcher.quant_table["int8:32x64"][:2]
    assert all(choice is not None and choice not in markers for choice in chosen), chosen
    assert layer.quant_plan[1] is not None


def test_quantized_layers_share_one_split_k_workspace_sized_by_their_plans():
    """`apply` gives every quantized layer whose installed plan splits K one workspace, big
    enough for the largest such call (a plan row or a prefill rung), and none to the others."""
    from thinkwise.kernels import triton_quant_gemm as tq
    from thinkwise.kernels.linear_methods.int8 import Int8Method, quantize_int8

    layers = []
    for n in (48, 96):
        layer = DispatchLinear(512, n, bias=False)
        q, scales = quantize_int8(torch.randn(n, 512), torch.float32)
        del layer.weight
        layer.weight = None
        layer.register_buffer("qweight", q)
        layer.register_buffer("scales", scales)
        layer.method = Int8Method(torch.float32)
        layers.append(layer)
    split = tq.QuantGemmConfig(block_n=16, block_k=64, split_k=3)
    plain = tq.QuantGemmConfig(block_n=16, block_k=64)
    layers[0].quant_plan, layers[0].quant_plan_above = (None, plain, split), [(None, None)]
    layers[1].quant_plan, layers[1].quant_plan_above = (None, plain), [(256, split), (None, None)]
    model = torch.nn.ModuleList(layers)
    GpuLinearDispatcher().apply(model)
    workspace = layers[0].split_k_workspace
    assert workspace is not None and layers[1].split_k_workspace is workspace
    needs = [tq.workspace_size(2, 48, 512, 512, False, split), tq.workspace_size(256, 96, 512, 512, False, split)]
    assert needs[1][0] > needs[0][0] > 0
    assert workspace.partials.numel() == needs[1][0] and workspace.counters.numel() == max(c for _, c in needs)
    layers[1].quant_plan_above = [(None, None)]  # no split-K left in its plan
    GpuLinearDispatcher().apply(model)
    assert layers[1].split_k_workspace is None and layers[0].split_k_workspace.partials.numel() == needs[0][0]
