"""Effective FLOPs, the device intensity table, the CPU probe, GPU time and energy charging."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from thinkwise.cost import DEVICE_INTENSITY, EnergyMeter, StepMeter, device_intensity, effective_flops
from thinkwise.cost.hardware import charge_step
from thinkwise.engine.sequence import TokenCounts


def test_effective_flops_is_flops_plus_intensity_times_bytes():
    assert effective_flops(10.0, 4.0, 2.5) == 20.0
    assert effective_flops(1e12, 0.0, 295.0) == 1e12


def test_datasheet_intensities():
    # FLOP per byte; Kinetics counts bf16 elements (2 bytes), so its H100 constant is twice: ~590.
    assert DEVICE_INTENSITY["H100"] == 989e12 / 3.35e12
    assert 2 * DEVICE_INTENSITY["H100"] == pytest.approx(590, abs=1)
    assert DEVICE_INTENSITY["H200"] == 989e12 / 4.8e12
    assert DEVICE_INTENSITY["A100"] == 312e12 / 2.039e12


@pytest.mark.parametrize("name,entry", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-SXM4-40GB", "A100-SXM4-40GB"),
])
def test_gpu_names_pick_their_table_entry(monkeypatch, name, entry):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_intensity("cuda:0") == (DEVICE_INTENSITY[entry], f"datasheet {entry}")


def test_cpu_intensity_is_measured():
    intensity, source = device_intensity("cpu")
    assert source == "measured on this CPU"
    assert 0.1 < intensity < 1e4  # FLOP/s over bytes/s of a real CPU
    assert device_intensity("cpu")[0] == intensity  # probed once per process


def test_no_energy_or_gpu_time_on_cpu():
    meter = EnergyMeter("cpu")
    assert not meter.available and meter.joules() is None and meter.power_w() is None
    step = StepMeter("cpu")
    assert not step.enabled and not step.energy_available
    seq = SimpleNamespace(request=SimpleNamespace(counts=TokenCounts()))
    ticket = step.start()
    step.end(ticket)
    step.charge(ticket, [seq], [3])
    assert seq.request.counts.device_time_s == 0.0 and seq.request.counts.energy_j is None


def test_step_time_and_energy_split_by_token_share():
    a, b = (SimpleNamespace(request=SimpleNamespace(counts=TokenCounts())) for _ in range(2))
    charge_step([a, b], [3, 1], 0.004, 2.0)
    charge_step([a], [1], 0.001, None)  # a step with no energy reading adds time only
    assert a.request.counts.device_time_s == pytest.approx(0.004)
    assert b.request.counts.device_time_s == pytest.approx(0.001)
    assert (a.request.counts.energy_j, b.request.counts.energy_j) == (1.5, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_steps_are_timed_and_energy_follows_nvml(tiny_llama):
    from thinkwise import LLM, SamplingParams

    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="bfloat16", device="cuda", num_kv_blocks=64)
    outs = llm.generate([[256, 1, 2, 3], [256, 4, 5, 6, 7, 8]],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    try:
        import pynvml  # noqa: F401

        nvml = llm.engine.step_meter.energy_available
    except ImportError:
        nvml = False
    for out in outs:
        assert out.counts.device_time_s > 0
        assert (out.counts.energy_j is not None) == nvml
        if nvml:
            assert out.counts.energy_j > 0
    assert llm.engine.run_metadata["energy"] == ("nvml" if nvml else "unavailable")
