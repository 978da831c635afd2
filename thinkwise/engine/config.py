"""Engine settings (memory, batching, device, kernels) and their defaults per device.

Every knob of the engine is a field here. The kernel knobs can also be overridden by
environment variables, read in one place (`engine/env_overrides.py`, which lists them)
when a config is built; the engine hands them to the kernels (`engine/kernel_settings.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thinkwise.engine.env_overrides import env_overrides
from thinkwise.errors import InvalidParameterError
from thinkwise.kernels.cpu_quant_gemm import DEFAULT_PREFETCH_MIB, MAX_PREFETCH_MIB
from thinkwise.kernels.paged_attention import ATTENTION_BACKENDS, FP8_KV_DTYPE
from thinkwise.reasoning.parser import PARSER_NAMES

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}
# KV cache storage, spelled as vLLM does: "auto" stores the compute dtype; "fp8" (= "fp8_e4m3")
# stores float8 e4m3 codes with one fp32 scale per token and KV head (kernels/paged_attention.py).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs that convert e4m3 in hardware


@dataclass
class EngineConfig:
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | torch.dtype | None = None  # None: bfloat16. The weights' storage dtype
    # The dtype of activations, norms, softmax and the KV cache; None: the same as `dtype`.
    # "float32" with 16-bit weights is LayerCast (Give Me FP32): weights stay 16-bit in memory
    # and are upcast at each matmul, so results no longer depend on which kernel a batch size
    # picks (seeded samples repeat whatever else is batched, across processes too).
    compute_dtype: str | torch.dtype | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from the memory budget below
    kv_cache_memory_gb: float = 1.0  # CPU: bytes for the KV cache
    gpu_memory_utilization: float = 0.9  # CUDA: share of free memory after loading
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    seed: int = 0  # draws the seeds of unseeded requests
    cuda_graphs: bool = True  # CUDA: replay decode steps as captured graphs
    # CUDA: FlashDecoding++ unified-max softmax in decode attention, phi calibrated at load.
    unified_max_softmax: bool = True
    # CUDA: cascade attention for decode samples sharing at least this many prompt tokens
    # (None: off). Below it the extra kernel costs more than the saved reads.
    cascade_min_shared_tokens: int | None = 256
    cpu_gemm_dispatch: bool = True  # CPU: profile torch vs fp32 BLAS per weight shape at start-up
    # CPU: a dispatch table to use instead of profiling ("OUTxIN" -> first M for BLAS, or None),
    # e.g. run_metadata["gemm_dispatch"]["blas_from_rows"] of an earlier run, to reproduce it.
    cpu_gemm_table: dict | None = None
    gpu_gemm_dispatch: bool = True  # CUDA: profile cuBLAS vs the Triton flat GEMM per weight shape and M at start-up
    cpu_torch_threads: int | None = 1  # with dispatch on: PyTorch threads during engine work (BLAS keeps its own)
    # Async scheduling: launch the next decode step, fed by this step's sampled tokens still
    # on the device, before reading them back, so the host's per-step work overlaps the GPU's.
    # None: on for CUDA with CUDA graphs (on CPU nothing overlaps; tests turn it on to check it).
    async_scheduling: bool | None = None
    # Kernel knobs (CUDA, and the CPU prefetch below), each overridable by an environment variable
    # (engine/env_overrides.py).
    attention_backend: str = "auto"  # "auto": Triton decode attention on CUDA; "torch": the reference everywhere
    fused_kernels: bool = True  # fused Triton element-wise kernels (RMSNorm, q/k norm + rotary + KV write, SiLU*up)
    gemm_epilogue_fusion: bool = True  # SiLU(gate) * up in the Triton gate/up GEMM's epilogue
    pdl: bool = True  # programmatic dependent launch of decode kernels (Hopper and newer)
    pdl_max_rows: int = 64  # steps with more token rows launch without PDL
    # CPU: MiB of the next layers' weights the quantized kernel's idle threads prefetch between
    # calls (kernels/cpu_quant_gemm.py; 0: off).
    cpu_weight_prefetch_mib: float = DEFAULT_PREFETCH_MIB
    # Reasoning models (thinkwise/reasoning/parser.py): how outputs split thinking from the
    # answer ("auto": from the chat template and tokenizer), the thinking budget each
    # `reasoning_effort` means (None: unlimited), and an optional message forced before the
    # closing marker when a thinking budget runs out (as llama.cpp's --reasoning-budget-message).
    reasoning_parser: str = "auto"
    reasoning_effort_budgets: dict = field(default_factory=lambda: {"low": 512, "medium": 2048, "high": 8192})
    thinking_budget_message: str | None = None
    # How linear layers store and multiply their weights (kernels/linear_methods): None keeps the
    # 16-bit weights; "int8" (per output channel), "int4[-g32|-g64|-g128]" (group-wise MLP weights;
    # attention and lm_head int8), "int4-all[-gN]" (attention int4 too), "gguf" (each layer near its
    # GGUF block type's bits). Quantized on load, round-to-nearest.
    quantization: str | None = None
    # KV cache storage: "auto" (the compute dtype) or "fp8" / "fp8_e4m3" (8-bit codes with per
    # token and KV head scales: about half the bytes, so about twice the blocks for the same memory).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name, value in env_overrides().items():
            setattr(self, name, value)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise InvalidParameterError(f"attention_backend {self.attention_backend!r} is not one of "
                                        f"{', '.join(ATTENTION_BACKENDS)}", param="attention_backend")
        if self.pdl_max_rows < 0:
            raise InvalidParameterError("pdl_max_rows must be >= 0", param="pdl_max_rows")
        if (isinstance(self.cpu_weight_prefetch_mib, bool) or not isinstance(self.cpu_weight_prefetch_mib, (int, float))
                or not 0 <= self.cpu_weight_prefetch_mib <= MAX_PREFETCH_MIB):
            raise InvalidParameterError(f"cpu_weight_prefetch_mib must be a number of MiB in [0, {MAX_PREFETCH_MIB}] "
                                        f"(0: off), not {self.cpu_weight_prefetch_mib!r}",
                                        param="cpu_weight_prefetch_mib")
        if self.reasoning_parser not in PARSER_NAMES:
            raise InvalidParameterError(f"unknown reasoning parser {self.reasoning_parser!r}; use one of "
                                        f"{', '.join(PARSER_NAMES)}", param="reasoning_parser")
        for effort, budget in self.reasoning_effort_budgets.items():
            if effort not in ("low", "medium", "high") or (budget is not None and (not isinstance(budget, int)
                                                                                 or budget < 1)):
                raise InvalidParameterError(
                    f"reasoning_effort_budgets maps low/medium/high to a thinking budget >= 1 or None; got "
                    f"{effort!r}: {budget!r}", param="reasoning_effort_budgets")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be >= 1", param=name)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise InvalidParameterError("num_kv_blocks must be >= 1", param="num_kv_blocks")
        if self.compute_dtype is not None:  # a bad or narrower compute dtype fails before any loading
            resolve_compute_dtype(self.compute_dtype, resolve_dtype(self.dtype, None), None)
        if self.quantization is not None:
            from thinkwise.kernels.linear_methods import parse_quantization

            if parse_quantization(self.quantization) is not None and self.compute_dtype is not None and \
                    resolve_dtype(self.compute_dtype, None) != resolve_dtype(self.dtype, None):
                raise InvalidParameterError(
                    "quantization cannot be combined with a compute_dtype other than dtype (LayerCast upcasts "
                    "16-bit weights; quantized weights are dequantized inside their kernels): drop one of them",
                    param="quantization")
        if not isinstance(self.kv_cache_dtype, str) or self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidParameterError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of "
                                        f"{', '.join(KV_CACHE_DTYPES)}", param="kv_cache_dtype")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidParameterError("gpu_memory_utilization must be in (0, 1]", param="gpu_memory_utilization")


@dataclass(frozen=True)
class Placement:
    """Where and in which dtypes an engine runs, resolved from an `EngineConfig`."""

    device: torch.device
    weight_dtype: torch.dtype  # how the weights are stored
    compute_dtype: torch.dtype  # activations, norms, softmax and the KV cache


def resolve_placement(config: EngineConfig) -> Placement:
    device = resolve_device(config.device)
    weight_dtype = resolve_dtype(config.dtype, device)
    return Placement(device, weight_dtype, resolve_compute_dtype(config.compute_dtype, weight_dtype, device))


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu",
                                    param="device")
    return dev


def stage_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without making the host wait for the device: through
    pinned memory and a non-blocking copy on CUDA (`torch.tensor(..., device="cuda")`
    synchronizes the stream, which would stall a step launched behind another)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, param: str = "dtype") -> torch.dtype:
    if dtype is None:
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InvalidParameterError(f"{param} {dtype!r} is not one of {', '.join(_DTYPES)}", param=param)
    return _DTYPES[dtype]


def resolve_kv_cache_dtype(kv_cache_dtype: str, device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype. fp8 on a CUDA GPU older than compute capability 8.9 is
    refused (its kernels cannot convert e4m3), never silently emulated or stored wide."""
    if kv_cache_dtype == "auto":
        return compute_dtype
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < FP8_MIN_CAPABILITY:
            raise InvalidParameterError(
                f"kv_cache_dtype {kv_cache_dtype!r} needs a GPU with fp8 support (compute capability 8.9 or newer: "
                f"Ada, Hopper, Blackwell); this GPU is {capability[0]}.{capability[1]}: use kv_cache_dtype='auto' "
                "(--kv-cache-dtype auto)", param="kv_cache_dtype")
    return FP8_KV_DTYPE


def resolve_compute_dtype(compute_dtype: str | torch.dtype | None, weight_dtype: torch.dtype,
                          device: torch.device) -> torch.dtype:
    """The activations' dtype: `weight_dtype` unless given; never narrower than the weights."""
    if compute_dtype is None:
        return weight_dtype
    resolved = resolve_dtype(compute_dtype, device, param="compute_dtype")
    if resolved.itemsize < weight_dtype.itemsize:
        raise InvalidParameterError(
            f"compute_dtype {compute_dtype!r} is narrower than the weights' dtype {weight_dtype}; "
            "lower dtype instead, or use compute_dtype='float32'", param="compute_dtype")
    return resolved
