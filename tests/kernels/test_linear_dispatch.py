"""The CPU GEMM dispatcher: profiled switch points, and a preset table that pins them."""

from __future__ import annotations

import torch

from thinkwise.kernels.linear_dispatch import DispatchLinear, LinearDispatcher


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
