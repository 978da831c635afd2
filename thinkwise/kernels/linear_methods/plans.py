"""What the quantized methods share on CUDA: following the dispatch table, and offering
their Triton tilings to it.

`linear_dispatch.GpuLinearDispatcher` times each quantized weight shape per row count
(the same ladder as the 16-bit table, plus prefill-sized rungs) between the method's
Triton tilings and dequantize-then-cuBLAS, and installs on each layer `quant_plan` (entry
M: the tiling for M rows, or None) and `quant_plan_above` (for more rows than the plan
covers: [(top rows, choice), ...], the last top None for every larger M). Without a table every call takes the dequantize-then-cuBLAS path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def planned_config(layer, rows: int):
    plan = getattr(layer, "quant_plan", None)
    if plan is None:
        return None
    if rows < len(plan):
        return plan[rows]
    above = getattr(layer, "quant_plan_above", None)
    if not isinstance(above, list):
        return above
    return next(choice for top, choice in above if top is None or rows <= top)


def gpu_apply(method, layer, x: torch.Tensor, q, scales, zeros, group: int) -> torch.Tensor:
    config = planned_config(layer, x.reshape(-1, layer.in_features).shape[0])
    if config is None:
        return method.reference(layer, x)
    from thinkwise.kernels.triton_quant_gemm import triton_quant_gemm

    return triton_quant_gemm(x, q, scales, zeros, layer.bias, group, config,
                             workspace=getattr(layer, "split_k_workspace", None))


def gpu_apply_silu_mul(layer, x: torch.Tensor, q, scales, zeros, group: int) -> torch.Tensor | None:
    """SiLU(gate) * up of a fused [gate; up] layer in one launch: the tiling the table picked
    for x's row count, with the SiLU * up epilogue; None where the table picked
    dequantize-then-cuBLAS or the tiling cannot fuse (the caller runs the GEMM, then the
    element-wise kernel). Bit for bit the unfused result."""
    config = planned_config(layer, x.reshape(-1, layer.in_features).shape[0])
    if config is None:
        return None
    from thinkwise.kernels import triton_quant_gemm as tq

    if not tq.gated_fits(layer.out_features, config, layer.bias):
        return None
    return tq.triton_quant_gemm(x, q, scales, zeros, None, group, config, tq.EPILOGUE_SILU_MUL,
                                getattr(layer, "split_k_workspace", None))


def split_k_need(layer, q, zeros, group: int) -> tuple[int, int]:
    """(partial floats, counters) the largest split-K call of the layer's installed plan needs
    (the dispatcher sizes one shared `SplitKWorkspace` from it); (0, 0) without split-K."""
    from thinkwise.kernels import triton_quant_gemm as tq

    need = (0, 0)
    plan = getattr(layer, "quant_plan", None) or ()
    above = getattr(layer, "quant_plan_above", None)
    rungs = [*enumerate(plan), *((top, config) for top, config in above if top is not None)] \
        if isinstance(above, list) else list(enumerate(plan))
    for rows, config in rungs:
        if config is not None:
            size = tq.workspace_size(rows, layer.out_features, layer.in_features, group, zeros is not None, config)
            need = (max(need[0], size[0]), max(need[1], size[1]))
    return need


_CANDIDATE_WORKSPACES: dict[str, object] = {}


def release_candidate_workspaces() -> None:
    """Drop the timing workspaces (the dispatcher calls it once its table is built)."""
    _CANDIDATE_WORKSPACES.clear()


def _candidate_workspace(device: torch.device, need: tuple[int, int]):
    """One growing workspace per device for the tilings the start-up table times: its calls
    run one after another on one stream, as the model's do, so they can share it."""
    from thinkwise.kernels.triton_gemm import SplitKWorkspace

    held = _CANDIDATE_WORKSPACES.get(str(device))
    if held is None or not held.fits(*need):
        size = (max(need[0], held.partials.numel() if held else 0), max(need[1], held.counters.numel() if held else 0))
        held = _CANDIDATE_WORKSPACES[str(device)] = SplitKWorkspace(device, *size)
    return held


def quant_candidates(layer, rows: int, q, scales, zeros, group: int) -> dict[str, tuple[object, Callable]]:
    """name -> (tiling, call x -> y) for every Triton tiling offered for `rows` rows."""
    from thinkwise.kernels import triton_quant_gemm as tq

    if not tq.HAVE_TRITON or q.shape[1] % 4:  # the kernels read whole 4-byte words of codes per row
        return {}
    out = {}
    for config in tq.DEFAULT_CONFIGS:
        if rows > config.max_rows or ((config.half2 or config.bf16_pairs) and zeros is None):  # int4-only decodes
            continue
        if config.x_quads and zeros is not None:  # an int8-only x path (int4 would run the plain GEMV again)
            continue
        if config.bf16_pairs and scales.dtype not in tq.PAIRS_DTYPES:  # a model in another dtype: a duplicate
            continue
        need = tq.workspace_size(rows, q.shape[0], q.shape[1] * (2 if zeros is not None else 1), group,
                                 zeros is not None, config)
        workspace = _candidate_workspace(q.device, need) if need[1] else None
        out[f"triton:{config.name}"] = (
            config, lambda x, c=config, ws=workspace: tq.triton_quant_gemm(x, q, scales, zeros, layer.bias, group, c,
                                                                            workspace=ws))
    return out
