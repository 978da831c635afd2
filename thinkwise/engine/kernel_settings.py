"""Hands the kernel knobs of an `EngineConfig` to the kernel modules that use them.

The kernels keep one process-wide setting each (a kernel launched inside a CUDA graph or
a GEMM-profiling run has no engine to ask), set here, before the engine profiles GEMMs
or captures graphs; the last engine built in a process decides them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def kernel_settings_kept() -> Iterator[None]:
    """Puts back, on exit, every setting `apply_kernel_settings` hands out, through the same
    setters (for tests: an engine built inside with other knobs must not change the next test's)."""
    from thinkwise.kernels import fused

    saved = (paged_attention.ATTENTION_BACKEND, fused.FUSED, linear_dispatch.epilogue_fusion_enabled(), pdl.enabled(),
             pdl.max_rows(), cpu_quant_gemm.weight_prefetch_mib())
    try:
        yield
    finally:
        backend, fused_on, epilogue, pdl_on, pdl_rows, prefetch = saved
        paged_attention.set_attention_backend(backend)
        fused.set_fused_kernels(fused_on)
        linear_dispatch.set_epilogue_fusion(epilogue)
        pdl.configure(enabled=pdl_on, max_rows=pdl_rows)
        cpu_quant_gemm.set_weight_prefetch(prefetch)
