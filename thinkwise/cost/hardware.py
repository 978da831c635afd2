"""Hardware side of the cost model: arithmetic intensity, effective FLOPs, GPU time, energy.

Kinetics' effective FLOPs charge memory traffic at the price of compute:
eFLOPs = FLOPs + I x bytes, with I = peak FLOP/s / memory bandwidth of the device, in FLOP
per byte. (The Kinetics code counts traffic in bf16 elements of 2 bytes, so its constant
is twice ours: H100 SXM 2 x 989e12 / 3.35e12 = 590 per element = 295 per byte here.) I
comes from a table of datasheet figures for the GPUs we know (dense bf16 tensor-core peak,
HBM bandwidth) and, on a CPU or an unknown GPU, from a short measurement on this machine
(a large matmul for FLOP/s, a large copy for bytes/s), cached for the process.

`StepMeter` times each engine step on the GPU with CUDA events and charges the time (and
the energy) to the step's requests in proportion to the tokens each computed. Energy
comes from NVML's total-energy counter (`pynvml`, from nvidia-ml-py, when importable and
a GPU is present). On an H100 that counter advances every 100 ms and one read takes ~4 ms,
far longer than a decode step, so a background thread reads it once per update interval;
a step is charged the counter's average power over the latest interval times the step's
GPU time. Without NVML or a GPU, energy is None: unavailable, never estimated.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass

import torch

# name fragment -> (peak dense bf16 FLOP/s, memory bytes/s), datasheet values. Checked in
# order, most specific fragment first ("H100 PCIe" before "H100").
DEVICE_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 4.8e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989e12, 3.35e12),  # SXM
    "A100-SXM4-40GB": (312e12, 1.555e12),
    "A100-PCIE-40GB": (312e12, 1.555e12),
    "A100": (312e12, 2.039e12),  # 80 GB
}
# FLOP per byte moved: what one byte of traffic costs in FLOPs on that device.
DEVICE_INTENSITY: dict[str, float] = {name: flops / bandwidth for name, (flops, bandwidth) in DEVICE_PEAKS.items()}


def effective_flops(flops: float, bytes_moved: float, intensity: float) -> float:
    """Kinetics: FLOPs + I x bytes (I in FLOP per byte)."""
    return flops + intensity * bytes_moved


@functools.lru_cache(maxsize=None)
def measured_peaks(device: str = "cpu") -> tuple[float, float]:
    """(FLOP/s, bytes/s) measured on `device`: best of a few matmuls and of a few copies
    larger than the last-level cache (a copy moves its size twice: read and write)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    size, dtype = (4096, torch.bfloat16) if cuda else (1024, torch.float32)
    copy_bytes = (1 << 30) if cuda else (64 << 20)

    def best_of(fn, repeats: int = 3) -> float:
        fn()  # warm-up (allocation, kernel selection, page faults)
        best = float("inf")
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - start)
        return best

    a = torch.randn(size, size, device=dev).to(dtype)
    flops = 2 * size**3 / best_of(lambda: a @ a)
    del a
    src = torch.empty(copy_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    bandwidth = 2 * copy_bytes / best_of(lambda: dst.copy_(src))
    return flops, bandwidth


def device_intensity(device: torch.device | str) -> tuple[float, str]:
    """I = peak FLOP/s / bandwidth (FLOP per byte), and where the numbers came from."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (flops, bandwidth) in DEVICE_PEAKS.items():
            if fragment in name:
                return flops / bandwidth, f"datasheet {fragment}"
        flops, bandwidth = measured_peaks(str(device))
        return flops / bandwidth, f"measured on {name} (not in the datasheet table)"
    flops, bandwidth = measured_peaks("cpu")
    return flops / bandwidth, "measured on this CPU"


def _nvml_handle(device: torch.device):
    """The NVML handle of a torch CUDA device (by UUID, so CUDA_VISIBLE_DEVICES cannot
    mismatch it), or None where NVML or its energy counter is unavailable."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = None
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except pynvml.NVMLError:
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises where the GPU has no counter
        return handle
    except pynvml.NVMLError:  # no driver access, an old GPU, or no permission: energy unavailable
        return None


@dataclass
class _EnergySample:
    time_s: float
    joules: float


class EnergyMeter:
    """NVML total energy of one GPU, read by a background thread every `period_s`.

    `power_w()` is the counter's average power between its two latest distinct readings,
    `joules()` its latest reading. `available` is False without NVML or a GPU; then both
    return None. One poller per GPU serves the whole process.
    """

    _pollers: dict[str, EnergyMeter] = {}
    _lock = threading.Lock()

    def __new__(cls, device: torch.device | str, period_s: float = 0.1):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" share one poller
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        with cls._lock:
            meter = cls._pollers.get(key)
            if meter is None:
                meter = super().__new__(cls)
                meter._start(device, period_s)
                cls._pollers[key] = meter
            return meter

    def _start(self, device: torch.device, period_s: float) -> None:
        self.handle = _nvml_handle(device) if device.type == "cuda" else None
        self.period_s = period_s
        self._samples: list[_EnergySample] = []  # the two latest distinct readings
        self._guard = threading.Lock()
        if self.handle is None:
            return
        # Wait for two distinct readings (one update interval) so power is known from the first step.
        deadline = time.monotonic() + 10 * period_s
        self._sample()
        while len(self._samples) < 2 and time.monotonic() < deadline:
            time.sleep(period_s / 4)
            self._sample()
        thread = threading.Thread(target=self._poll, name=f"thinkwise-nvml-{device}", daemon=True)
        thread.start()

    @property
    def available(self) -> bool:
        return self.handle is not None

    def _sample(self) -> None:
        import pynvml

        joules = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # NVML reports mJ
        now = time.monotonic()
        with self._guard:
            if not self._samples or joules != self._samples[-1].joules:
                self._samples = (self._samples + [_EnergySample(now, joules)])[-2:]

    def _poll(self) -> None:
        import pynvml

        while True:
            time.sleep(self.period_s)
            try:
                self._sample()
            except pynvml.NVMLError:  # the GPU went away: keep the last power, stop polling
                return

    def joules(self) -> float | None:
        with self._guard:
            return self._samples[-1].joules if self._samples else None

    def power_w(self) -> float | None:
        with self._guard:
            if len(self._samples) < 2:
                return None
            first, last = self._samples
        return (last.joules - first.joules) / (last.time_s - first.time_s)


class StepMeter:
    """GPU time (CUDA events) and energy of each engine step, charged to the step's requests
    in proportion to the tokens each computed. Does nothing on CPU, where a request's wall
    time is the honest measure.

    `start()` goes before the runner and returns the step's ticket; `end(ticket)` right
    after the step's work is queued (before a step launched behind it); `charge(ticket,
    ...)` once the step's sampled tokens are on the host, so its end event is complete and
    charging adds no sync. Each step has its own events, so with async scheduling two
    steps can be in flight and each is timed on its own.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.enabled = self.device.type == "cuda"
        self.energy = EnergyMeter(self.device) if self.enabled else None

    @property
    def energy_available(self) -> bool:
        return self.energy is not None and self.energy.available

    def start(self) -> list | None:
        if not self.enabled:
            return None
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        return [begin, None]

    def end(self, ticket: list | None) -> None:
        if ticket is not None and ticket[1] is None:
            ticket[1] = torch.cuda.Event(enable_timing=True)
            ticket[1].record()

    def charge(self, ticket: list | None, sequences, num_new_tokens) -> None:
        if ticket is None or not sequences:
            return
        self.end(ticket)
        begin, end = ticket
        end.synchronize()
        seconds = begin.elapsed_time(end) / 1e3
        power = self.energy.power_w() if self.energy is not None else None
        charge_step(sequences, num_new_tokens, seconds, None if power is None else power * seconds)


def charge_step(sequences, num_new_tokens, seconds: float, joules: float | None) -> None:
    """Split one step's device time and energy over its sequences' requests by token share."""
    total = sum(num_new_tokens)
    for seq, n in zip(sequences, num_new_tokens):
        counts = seq.request.counts
        counts.device_time_s += seconds * n / total
        if joules is not None:
            counts.energy_j = (counts.energy_j or 0.0) + joules * n / total
