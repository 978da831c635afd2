"""Hands the kernel knobs of an `EngineConfig` to the kernel modules that use them.

The kernels keep one process-wide setting each (a kernel launched inside a CUDA graph or
a GEMM-profiling run has no engine to ask), set here, before the engine profiles GEMMs
or captures graphs; the last engine built in a process decides them.
"""

from __future__ import annotations

from thinkwise.engine.config import EngineConfig
from thinkwise.kernels import cpu_quant_gemm, linear_dispatch, paged_attention, pdl


def apply_kernel_settings(config: EngineConfig) -> None:
    # Imported here: importing it defines Triton kernels, which must follow TRITON_INTERPRET.
    from thinkwise.kernels import fused

    paged_attention.set_attention_backend(config.attention_backend)
    fused.set_fused_kernels(config.fused_kernels)
    linear_dispatch.set_epilogue_fusion(config.gemm_epilogue_fusion)
    pdl.configure(enabled=config.pdl, max_rows=config.pdl_max_rows)
    cpu_quant_gemm.set_weight_prefetch(config.cpu_weight_prefetch_mib)
