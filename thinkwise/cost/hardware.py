"""Hardware side of the cost model: arithmetic intensity, effective FLOPs, energy.

Kinetics' effective FLOPs charge memory traffic at the price of compute:
eFLOPs = FLOPs + I x bytes, with I = peak FLOP/s / memory bandwidth of the device. I
comes from a table of datasheet figures for GPUs (dense bf16 tensor-core peak, HBM
bandwidth) and, on a CPU, from a short measurement on this machine (a large fp32 matmul
for FLOP/s, a large copy for bytes/s), cached for the process. Energy comes from NVML's
total-energy counter (`pynvml`, if installed and a GPU is present); otherwise it is None,
never estimated.
"""

from __future__ import annotations

import functools
import time

import torch

# name fragment -> (peak dense bf16 FLOP/s, memory bytes/s), datasheet values (SXM parts).
DEVICE_PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.039e12),
}


@functools.lru_cache(maxsize=None)
def measured_cpu_peaks(size: int = 1024, copy_mb: int = 256) -> tuple[float, float]:
    """(FLOP/s, bytes/s) of this CPU: best of a few fp32 matmuls and large copies."""
    a = torch.randn(size, size)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    flops = 2 * size**3 / best
    src = torch.empty(copy_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return flops, 2 * src.numel() * 4 / best


def device_intensity(device: torch.device | str) -> tuple[float, str]:
    """I = peak FLOP/s / bandwidth, and where the numbers came from."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (flops, bandwidth) in DEVICE_PEAKS.items():
            if fragment in name:
                return flops / bandwidth, f"datasheet {fragment}"
        props = torch.cuda.get_device_properties(device)
        return 0.0, f"unknown GPU {props.name}: no table entry"
    flops, bandwidth = measured_cpu_peaks()
    return flops / bandwidth, "measured on this CPU"


def effective_flops(flops: float, bytes_moved: float, intensity: float) -> float:
    """Kinetics: FLOPs + I x bytes."""
    return flops + intensity * bytes_moved


class EnergyMeter:
    """NVML total energy (joules) of one GPU; `available` is False without NVML or a GPU."""

    def __init__(self, device: torch.device | str):
        self.handle = None
        device = torch.device(device)
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._read = pynvml.nvmlDeviceGetTotalEnergyConsumption
        except Exception:  # noqa: BLE001 (no NVML, an old driver, or no permission: energy unavailable)
            self.handle = None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def joules(self) -> float | None:
        return self._read(self.handle) / 1e3 if self.handle is not None else None  # NVML reports mJ


class StepMeter:
    """GPU time (CUDA events) and NVML energy of each engine step, charged to the step's
    requests in proportion to the tokens each computed. Does nothing on CPU, where a
    request's wall time is the honest measure."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self.energy = EnergyMeter(self.device)
        if self.enabled:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        self._joules = None

    def start(self) -> None:
        if self.enabled:
            self._joules = self.energy.joules()
            self._begin.record()

    def stop(self, sequences, num_new_tokens) -> None:
        if not self.enabled or not sequences:
            return
        self._end.record()
        self._end.synchronize()  # the sampler waits for these results right after anyway
        seconds = self._begin.elapsed_time(self._end) / 1e3
        joules = None
        if self._joules is not None:
            joules = self.energy.joules() - self._joules
        total = sum(num_new_tokens)
        for seq, n in zip(sequences, num_new_tokens):
            counts = seq.request.counts
            counts.device_time_s += seconds * n / total
            if joules is not None:
                counts.energy_j = (counts.energy_j or 0.0) + joules * n / total
