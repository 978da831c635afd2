"""Heuristic GEMM dataflow for CPU (FlashDecoding++'s idea, applied to this machine).

A model has a handful of weight shapes, and which matrix-multiply implementation is
fastest depends on the shape and on M, the number of token rows in the step: one row
(batch-1 decode) is a memory-bound GEMV, a few rows (n samples decoding together) a
"flat GEMM", many rows (prefill) a compute-bound GEMM. On CPUs the candidates differ a
lot: PyTorch's bf16 kernels read half the bytes (best for one row) but scale linearly
with M on CPUs without native bf16 instructions, while an fp32 BLAS GEMM (numpy's
OpenBLAS; MKL is slow on AMD CPUs) amortises the weights over many rows. So at start-up
`LinearDispatcher.profile` times each candidate for each weight shape over a ladder of
M, sweeping every layer's weight of that shape so the timing sees DRAM, not cache, and
keeps a switch point per shape; at run time a lookup picks the implementation. The fp32
copy costs memory, so it is only made where a candidate needs it.

On CUDA, `GpuLinearDispatcher` does the same between cuBLAS (`F.linear`) and the Triton
flat GEMM of `triton_gemm` (a few tilings) over M = 1..64: each candidate's calls over
several layers' weights are captured in a CUDA graph and replayed, timed with CUDA
events, so the timing sees HBM rather than L2 and no Python launch gaps. Each call is
preceded by an RMSNorm of its input, as in a decoder layer, so the timing also counts the
kernel boundary (which programmatic dependent launch shortens for the Triton kernels:
`pdl`). The result is
a table per weight shape (M ranges -> implementation, with the timings), which goes
into the run's metadata, and a per-layer list indexed by M that `DispatchLinear.forward`
reads: the choice depends only on the static shape, so it needs no host sync and holds
under CUDA-graph capture.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from thinkwise.kernels import pdl

if TYPE_CHECKING:
    from thinkwise.kernels.linear_methods.base import LinearMethod
    from thinkwise.kernels.triton_gemm import FlatGemmConfig, SplitKWorkspace

# `triton_gemm` is imported where it is used: importing it defines Triton kernels, which
# must happen after TRITON_INTERPRET is set (the CPU test suite sets it after `import thinkwise`).

PROFILE_ROWS = (1, 2, 4, 8, 16)  # above 16 rows, the decision at 16 holds
PROFILE_LAYERS = 4  # weights swept per shape: enough to spill the last-level cache for big shapes


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Run PyTorch's CPU ops on `count` threads inside the block (None: unchanged).

    PyTorch's OpenMP workers and OpenBLAS's workers spin-wait after their work; on a
    machine with few cores each pool then starves the other, and small element-wise
    ops measured 100x slower. Keeping PyTorch to one thread while BLAS uses the cores
    avoids that, and is restored on exit so other code in the process is unaffected.
    """
    if count is None or count == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_epilogue_fusion = True  # set from EngineConfig.gemm_epilogue_fusion (THINKWISE_GEMM_EPILOGUE)


def set_epilogue_fusion(enabled: bool) -> None:
    global _epilogue_fusion
    _epilogue_fusion = bool(enabled)


def epilogue_fusion_enabled() -> bool:
    """Whether a Triton gate/up GEMM applies SiLU(gate) * up in its epilogue (off: a
    separate kernel, for A/B runs). Read at each call, like `pdl.pdl_enabled`, so a run
    can switch it before capturing its graphs."""
    return _epilogue_fusion


class DispatchLinear(nn.Module):
    """nn.Linear whose matmul may run in fp32 BLAS for larger M (CPU), or in the Triton
    flat GEMM for small M (CUDA), as a dispatcher's table says. With a `method` (a
    `linear_methods.LinearMethod`, set after loading) the layer holds that method's
    quantized buffers instead of `weight`, and the method does the multiply."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.blas_weight: np.ndarray | None = None  # fp32 [in, out] view or copy, for BLAS
        self.blas_from_rows: int | None = None  # use BLAS when rows >= this; None: never
        # GPU: row_plan[M] is the Triton config for M rows (None: F.linear); past its end, F.linear.
        self.row_plan: tuple[FlatGemmConfig | None, ...] | None = None
        self.split_k_workspace: SplitKWorkspace | None = None
        self.method: LinearMethod | None = None  # None: the 16-bit weight above, multiplied as below

    def enable_blas(self) -> None:
        weight = self.weight.detach()
        if weight.dtype == torch.float32:
            self.blas_weight = weight.numpy().T  # zero-copy transposed view
        else:
            self.blas_weight = np.ascontiguousarray(weight.float().numpy().T)

    def triton_config(self, x: torch.Tensor) -> FlatGemmConfig | None:
        """The Triton tiling the table gives x's row count, or None (cuBLAS / CPU)."""
        plan = self.row_plan
        rows = x.shape[0]
        if plan is None or rows >= len(plan) or x.dim() != 2:
            return None
        return plan[rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method is not None:
            return self.method.apply(self, x)
        config = self.triton_config(x)
        if config is not None:
            from thinkwise.kernels import triton_gemm

            return triton_gemm.triton_flat_gemm(x, self.weight, self.bias, config, self.split_k_workspace)
        rows = x.shape[0]
        if self.blas_from_rows is not None and rows >= self.blas_from_rows:
            out = torch.from_numpy(x.float().numpy() @ self.blas_weight)
            if self.bias is not None:
                out += self.bias
            return out.to(x.dtype)
        weight = self.weight
        if weight.dtype != x.dtype:  # LayerCast: 16-bit storage, the matmul in x's (fp32) dtype
            weight = weight.to(x.dtype)
        return nn.functional.linear(x, weight, self.bias)

    def forward_gated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """`activation(gate) * up` of this fused [gate; up] projection; the model names the
        activation (`fused.GATED_ACTIVATIONS`). One launch where the table picks a Triton
        GEMM (16-bit, or a quantized method's tiling) and an epilogue exists for the activation
        (SiLU); otherwise GEMM, then the element-wise kernel."""
        if activation == "silu" and epilogue_fusion_enabled():
            if self.method is not None:
                fused = self.method.apply_silu_mul(self, x)
                if fused is not None:
                    return fused
            config = self.triton_config(x) if self.method is None else None
            if config is not None and self.bias is None:
                from thinkwise.kernels import triton_gemm

                if triton_gemm.can_fuse_silu_mul(self.out_features, config):
                    return triton_gemm.triton_flat_gemm_silu_mul(x, self.weight, config, self.split_k_workspace)
        from thinkwise.kernels.fused import gated_activation

        return gated_activation(self(x), activation)


@dataclass
class LinearDispatcher:
    """Per-weight-shape switch points, profiled on this machine at start-up."""

    table: dict[tuple[int, int], int | None] = field(default_factory=dict)  # (out, in) -> first M for BLAS
    timings_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @staticmethod
    def _time(layers: list[DispatchLinear], rows: int, dtype: torch.dtype, blas: bool) -> float:
        inputs = torch.randn(rows, layers[0].in_features).to(dtype)
        for layer in layers:
            layer.blas_from_rows = 1 if blas else None
        best = float("inf")
        with torch.inference_mode():
            layers[0](inputs)  # warm-up
            for _ in range(2):
                start = time.perf_counter()
                for layer in layers:
                    layer(inputs)
                best = min(best, (time.perf_counter() - start) * 1e3 / len(layers))
        return best

    def profile(self, model: nn.Module, dtype: torch.dtype, preset: dict[str, int | None] | None = None) -> None:
        """Time each weight shape and set its switch point. `preset` ("OUTxIN" -> first M for
        BLAS, as `describe()` writes it) pins shapes instead of timing them: the switch changes
        the rounding of bf16 results, so runs that must reproduce each other (a benchmark
        rerun) must share one table rather than re-time under a different machine load."""
        groups: dict[tuple[int, int], list[DispatchLinear]] = defaultdict(list)
        for module in model.modules():
            # A quantized layer always runs its method's packed kernel: an fp32 BLAS copy
            # would undo the memory it saves.
            if isinstance(module, DispatchLinear) and module.method is None:
                groups[(module.out_features, module.in_features)].append(module)
        for shape, layers in groups.items():
            key = f"{shape[0]}x{shape[1]}"
            if preset is not None and key in preset:
                self.table[shape] = switch = preset[key]
                for layer in layers:
                    if switch is not None:
                        layer.enable_blas()
                    layer.blas_from_rows = switch
                continue
            for layer in layers:
                layer.enable_blas()
            sample = layers[:PROFILE_LAYERS]
            torch_ms = [self._time(sample, m, dtype, blas=False) for m in PROFILE_ROWS]
            blas_ms = [self._time(sample, m, dtype, blas=True) for m in PROFILE_ROWS]
            switch = None
            # First M from which BLAS wins at every larger profiled M as well.
            for i in range(len(PROFILE_ROWS)):
                if all(b < t for b, t in zip(blas_ms[i:], torch_ms[i:])):
                    switch = PROFILE_ROWS[i]
                    break
            self.table[shape] = switch
            self.timings_ms[f"{shape[0]}x{shape[1]}"] = {"rows": list(PROFILE_ROWS), "torch": [round(t, 3) for t in torch_ms],
                                                     "blas": [round(t, 3) for t in blas_ms]}
            for layer in layers:
                layer.blas_from_rows = switch
                if switch is None:
                    layer.blas_weight = None  # not used: free the fp32 copy

    def describe(self) -> dict:
        return {f"{o}x{i}": s for (o, i), s in self.table.items()}


# ----------------------------------------------------------------------------- CUDA

GPU_PROFILE_ROWS = (1, 2, 4, 8, 16, 32, 64)  # above 64 rows (prefill) cuBLAS's GEMMs are the ones to beat
TRITON_MIN_GAIN = 0.03  # Triton must be this much faster to be picked: cuBLAS is the default, ties are noise
# ...except where the step's kernels launch with PDL (`pdl`): there a Triton GEMM also
# overlaps the boundaries with its other neighbours, which a per-shape timing cannot see (H100,
# Llama-3-8B shape, batch 1: 161.5 tok/s with cuBLAS kept for the two largest matrices at a
# 1.7-2.8% deficit, 169.7 with Triton everywhere), so there Triton wins ties.
TRITON_MIN_GAIN_PDL = 0.0
L2_SWEEP = 3  # time over weights of at least this many L2 sizes, so reads come from HBM
GRAPH_BYTES = 256 << 20  # weight bytes one timed graph replay reads (long enough to time well)
MAX_GRAPH_CALLS = 64


# Quantized shapes: prefill-sized rungs, Triton GEMM vs dequantize + cuBLAS. Between 64 and
# a few hundred rows the in-kernel dequantizing GEMM still wins; by 2048 cuBLAS's tensor cores
# on a dequantized copy win (H200, Llama-3-8B int8: 200 us vs 920 us at 256 rows, with the
# float32 dequantize of the time).
QUANT_PREFILL_ROWS = (256, 2048)


def quantized_groups(model: nn.Module) -> dict[str, list[DispatchLinear]]:
    """Quantized layers grouped by method and shape ("int4-g32:9728x896" -> layers)."""
    groups: dict[str, list[DispatchLinear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, DispatchLinear) and module.method is not None:
            groups[f"{module.method.describe()}:{module.out_features}x{module.in_features}"].append(module)
    return groups


def pick_implementation(cublas_us: float, triton_us: dict[FlatGemmConfig, float],
                        min_gain: float = TRITON_MIN_GAIN) -> FlatGemmConfig | None:
    """The fastest Triton config if it beats cuBLAS by `min_gain`, else None (cuBLAS)."""
    best, best_us = None, cublas_us * (1 - min_gain)
    for config, us in triton_us.items():
        if us < best_us:
            best, best_us = config, us
    return best


QUANT_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (nan and inf give nan, which no tolerance accepts)."""
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-30))


def cuda_graph_time_us(calls: list[Callable[[], Any]], replays: int = 5) -> float:
    """Median GPU microseconds per call of `calls`, captured once in a CUDA graph and
    replayed (timed with CUDA events), as the engine's decode graphs run them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compiles Triton kernels and creates cuBLAS handles outside capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) * 1e3 / len(calls) for start, end in events]
    del graph
    return statistics.median(times)


@dataclass
class GpuLinearDispatcher:
    """Per-weight-shape choice between cuBLAS and the Triton flat GEMM, by M, profiled on
    this GPU at start-up. `table[(N, K)][i]` is the Triton config for M up to `rows[i]`
    (and above `rows[i - 1]`), or None for cuBLAS; M above the ladder always uses cuBLAS."""

    rows: tuple[int, ...] = GPU_PROFILE_ROWS
    candidates: tuple[FlatGemmConfig, ...] | None = None  # None: triton_gemm.DEFAULT_CONFIGS
    table: dict[tuple[int, int], list[FlatGemmConfig | None]] = field(default_factory=dict)
    timings_us: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    timed_layers: dict[str, int] = field(default_factory=dict)
    # Quantized layers, per "METHOD:NxK": the Triton tiling per rung of rows + QUANT_PREFILL_ROWS, or None
    # for dequantize-then-cuBLAS (the last rung decides every M above the ladder).
    quant_table: dict[str, list[Any]] = field(default_factory=dict)
    profile_seconds: float = 0.0
    device_name: str = ""
    skipped: str | None = None  # why no profile ran (then every shape uses cuBLAS)

    @staticmethod
    def _groups(model: nn.Module) -> dict[tuple[int, int], list[DispatchLinear]]:
        groups: dict[tuple[int, int], list[DispatchLinear]] = defaultdict(list)
        for module in model.modules():
            if isinstance(module, DispatchLinear) and module.method is None:
                groups[(module.out_features, module.in_features)].append(module)
        return groups

    def profile(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Time every candidate for every weight shape and M, then install the table."""
        from thinkwise.kernels import triton_gemm

        if self.candidates is None:
            self.candidates = triton_gemm.DEFAULT_CONFIGS
        groups = self._groups(model)
        quantized = quantized_groups(model)
        if not groups and not quantized:
            return
        device = (next(iter(groups.values()))[0].weight.device if groups
                  else next(next(iter(quantized.values()))[0].buffers()).device)
        if device.type != "cuda":
            self.skipped = "not a CUDA device"
        elif not triton_gemm.HAVE_TRITON:
            self.skipped = "triton is not installed"
        elif dtype not in (torch.bfloat16, torch.float16):
            self.skipped = f"{dtype} weights: the flat GEMM is for 16-bit weights"
        if self.skipped:
            return
        started = time.perf_counter()
        props = torch.cuda.get_device_properties(device)
        self.device_name = props.name
        with torch.inference_mode():
            for shape, layers in groups.items():
                self._profile_shape(shape, layers, props.L2_cache_size, dtype, device)
            for key, layers in quantized.items():
                self._profile_quantized(key, layers, props.L2_cache_size, dtype, device)
        if quantized:
            from thinkwise.kernels.linear_methods.plans import release_candidate_workspaces

            release_candidate_workspaces()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # graph pools: leave the memory to the KV cache
        self.profile_seconds = time.perf_counter() - started
        self.apply(model)

    def _profile_shape(self, shape: tuple[int, int], layers: list[DispatchLinear], l2_bytes: int,
                       dtype: torch.dtype, device: torch.device) -> None:
        from thinkwise.kernels import triton_gemm

        n, k = shape
        seen: set[int] = set()
        weights = []
        for layer in layers:  # tied weights appear once
            if layer.weight.data_ptr() not in seen:
                seen.add(layer.weight.data_ptr())
                weights.append((layer.weight.detach(), None if layer.bias is None else layer.bias.detach()))
        weight_bytes = n * k * layers[0].weight.element_size()
        count = min(len(weights), max(1, math.ceil(L2_SWEEP * l2_bytes / weight_bytes)))
        sample = weights[:count]
        passes = max(1, min(math.ceil(GRAPH_BYTES / (count * weight_bytes)), MAX_GRAPH_CALLS // count))
        key = f"{n}x{k}"
        self.timed_layers[key] = count
        timings: dict[str, list[float | None]] = {"cublas": []}
        for config in self.candidates:
            timings[f"triton:{config.name}"] = []
        choices: list[FlatGemmConfig | None] = []
        from thinkwise.kernels.fused import add_rms_norm

        norm_weight = torch.ones(k, device=device, dtype=dtype)

        def neighbour(x: torch.Tensor) -> torch.Tensor:  # the element-wise kernel before a GEMM in a layer
            return add_rms_norm(x, None, norm_weight, 1e-6)[0]

        for rows in self.rows:
            x = torch.randn(rows, k, device=device, dtype=dtype)
            cublas = cuda_graph_time_us([lambda x=x, w=w, b=b: nn.functional.linear(neighbour(x), w, b)
                                         for _ in range(passes) for w, b in sample])
            timings["cublas"].append(round(cublas, 2))
            triton_us: dict[FlatGemmConfig, float] = {}
            workspace = None
            for config in self.candidates:
                if rows > config.max_rows:
                    timings[f"triton:{config.name}"].append(None)
                    continue
                need = triton_gemm.workspace_size(rows, n, k, config, device)
                if workspace is None or not workspace.fits(*need):
                    workspace = triton_gemm.SplitKWorkspace(device, *need)
                us = cuda_graph_time_us([
                    lambda x=x, w=w, b=b, c=config, ws=workspace:
                    triton_gemm.triton_flat_gemm(neighbour(x), w, b, c, ws)
                    for _ in range(passes) for w, b in sample])
                timings[f"triton:{config.name}"].append(round(us, 2))
                triton_us[config] = us
            gain = TRITON_MIN_GAIN_PDL if pdl.pdl_enabled(device, rows) else TRITON_MIN_GAIN
            choices.append(pick_implementation(cublas, triton_us, gain))
        self.table[shape] = choices
        self.timings_us[key] = {"rows": list(self.rows), **timings}

    def _profile_quantized(self, key: str, layers: list[DispatchLinear], l2_bytes: int, dtype: torch.dtype,
                           device: torch.device) -> None:
        """Per M: the method's Triton tilings (dequantizing in the kernel) against
        dequantize-then-cuBLAS (the method's twin), each after an RMSNorm, captured and
        replayed like the 16-bit shapes; then install `quant_plan` on the layers."""
        from thinkwise.kernels.fused import add_rms_norm

        k = layers[0].in_features
        layer_bytes = layers[0].method.storage_bytes(layers[0])
        count = min(len(layers), max(1, math.ceil(L2_SWEEP * l2_bytes / layer_bytes)))
        sample = layers[:count]
        passes = max(1, min(math.ceil(GRAPH_BYTES / (count * layer_bytes)), MAX_GRAPH_CALLS // count))
        norm_weight = torch.ones(k, device=device, dtype=dtype)

        def neighbour(x: torch.Tensor) -> torch.Tensor:
            return add_rms_norm(x, None, norm_weight, 1e-6)[0]

        ladder = (*self.rows, *QUANT_PREFILL_ROWS)
        timings: dict[str, list[float | None]] = {"dequantize+cublas": []}
        failed: dict[str, str] = {}
        choices: list[Any] = []
        for rows in ladder:
            x = torch.randn(rows, k, device=device, dtype=dtype)
            base = cuda_graph_time_us([lambda x=x, layer=layer: layer.method.reference(layer, neighbour(x))
                                       for _ in range(passes) for layer in sample])
            timings["dequantize+cublas"].append(round(base, 2))
            per_name: dict[str, list] = defaultdict(list)
            for layer in sample:
                for name, (config, call) in layer.method.gpu_candidates(layer, rows).items():
                    per_name[name].append((config, call))
            triton_us: dict[Any, float] = {}
            want = sample[0].method.reference(sample[0], x).float() if per_name else None
            for name, calls in per_name.items():
                if name in failed:
                    continue
                try:
                    # A tiling is only timed once it computes the right thing here: a compiler can
                    # mis-build a tiling on one GPU that is right on another and in the interpreter.
                    error = relative_error(calls[0][1](x), want)
                    if not error <= QUANT_CHECK_TOLERANCE.get(dtype, 2e-2):
                        failed[name] = f"wrong result (relative error {error:.3g} against the twin)"
                        continue
                    us = cuda_graph_time_us([lambda x=x, call=call: call(neighbour(x)) for _ in range(passes)
                                             for _config, call in calls])
                except Exception as error:  # noqa: BLE001 - a tiling this GPU/Triton cannot build is skipped
                    # (say, too much shared memory on a smaller GPU); the others and cuBLAS remain, and
                    # the run metadata says which failed and why.
                    failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    continue
                timings.setdefault(name, [None] * (len(timings["dequantize+cublas"]) - 1)).append(round(us, 2))
                triton_us[calls[0][0]] = us
            for values in timings.values():  # tilings not offered at this M
                values.extend([None] * (len(timings["dequantize+cublas"]) - len(values)))
            gain = TRITON_MIN_GAIN_PDL if pdl.pdl_enabled(device, rows) else TRITON_MIN_GAIN
            choices.append(pick_implementation(base, triton_us, gain))
        self.quant_table[key] = choices
        self.timings_us[key] = {"rows": list(ladder), **timings, **({"failed": failed} if failed else {})}
        self.timed_layers[key] = count
        plan: list[Any] = [None]
        for rows in range(1, self.rows[-1] + 1):
            plan.append(choices[next(i for i, top in enumerate(self.rows) if rows <= top)])
        for layer in layers:
            layer.quant_plan = tuple(plan)
            layer.quant_plan_above = [*zip(QUANT_PREFILL_ROWS[:-1], choices[len(self.rows):-1]), (None, choices[-1])]

    def row_plan(self, shape: tuple[int, int]) -> tuple[FlatGemmConfig | None, ...] | None:
        """The per-M list DispatchLinear reads: entry M is the config for M rows."""
        choices = self.table.get(shape)
        if choices is None or all(c is None for c in choices):
            return None
        plan: list[FlatGemmConfig | None] = [None]
        for rows in range(1, self.rows[-1] + 1):
            plan.append(choices[next(i for i, top in enumerate(self.rows) if rows <= top)])
        return tuple(plan)

    def apply(self, model: nn.Module) -> None:
        """Install the table on every DispatchLinear, with one split-K workspace for all (16-bit
        and quantized layers alike: their launches run one after another on one stream)."""
        from thinkwise.kernels import triton_gemm

        groups = self._groups(model)
        plans = {shape: self.row_plan(shape) for shape in groups}
        partials = counters = 0
        device = None
        for shape, plan in plans.items():
            if plan is None:
                continue
            device = groups[shape][0].weight.device
            for rows, config in enumerate(plan):
                if config is not None:
                    p, c = triton_gemm.workspace_size(rows, shape[0], shape[1], config, device)
                    partials, counters = max(partials, p), max(counters, c)
        quantized = [layer for layers in quantized_groups(model).values() for layer in layers]
        needs = [layer.method.split_k_need(layer) for layer in quantized]  # plans from _profile_quantized
        for layer, (p, c) in zip(quantized, needs):
            if c:
                device = next(layer.buffers()).device
                partials, counters = max(partials, p), max(counters, c)
        workspace = triton_gemm.SplitKWorkspace(device, partials, counters) if device is not None and counters else None
        for shape, layers in groups.items():
            for layer in layers:
                layer.row_plan = plans[shape]
                layer.split_k_workspace = workspace if plans[shape] is not None else None
        for layer, (_, c) in zip(quantized, needs):
            layer.split_k_workspace = workspace if c else None

    def describe(self) -> dict[str, Any]:
        """The table for the run's metadata: per shape "NxK", M ranges -> implementation."""
        shapes: dict[str, list[dict[str, Any]]] = {}
        for (n, k), choices in self.table.items():
            ranges: list[dict[str, Any]] = []
            low = 1
            for top, config in zip(self.rows, choices):
                impl = "cublas" if config is None else f"triton:{config.name}"
                if ranges and ranges[-1]["impl"] == impl:
                    ranges[-1]["rows"][1] = top
                else:
                    ranges.append({"rows": [low, top], "impl": impl})
                low = top + 1
            ranges.append({"rows": [low, None], "impl": "cublas"})
            shapes[f"{n}x{k}"] = ranges
        for key, choices in self.quant_table.items():
            ranges = []
            low = 1
            for top, config in zip((*self.rows, *QUANT_PREFILL_ROWS), choices):
                impl = "dequantize+cublas" if config is None else f"triton:{config.name}"
                if ranges and ranges[-1]["impl"] == impl:
                    ranges[-1]["rows"][1] = top
                else:
                    ranges.append({"rows": [low, top], "impl": impl})
                low = top + 1
            ranges[-1]["rows"][1] = None  # the last rung's choice holds for every larger M
            shapes[key] = ranges
        out: dict[str, Any] = {"device": self.device_name, "implementations": shapes, "timings_us": self.timings_us,
                               "timed": "each GEMM call with the RMSNorm kernel before it",
                               "timed_layers": self.timed_layers, "profile_seconds": round(self.profile_seconds, 2)}
        if self.skipped:
            out["skipped"] = self.skipped
        return out
