"""Presence, frequency and repetition penalties applied to a [rows, vocab] logits matrix in one pass.

Each logits row r names the row `slots[r]` of the tracker's tables (-1: no penalties) and
carries its (repetition, frequency, presence) in `params[r]`. With c the slot's count row
(int32, generated tokens) and m its prompt mask row (bool), every token t of a penalized row
becomes vLLM's
    x = x / rep if x > 0 else x * rep      where m[t] or c[t] > 0
    x = x - freq * c[t] - pres * (c[t] > 0)
and a row without penalties is copied unchanged. The result is a new fp32 tensor: the
caller's logits are never written (the engine reads them again for DeepConf's confidence).
The Triton kernel reads each element of the logits, the count row and the mask row once
and writes the output once, in one launch for the whole batch; PyTorch needs about ten
dense passes for the same. `penalize_twin` is the plain-PyTorch twin with the same
signature: the CPU path and the kernel's reference. The kernel divides with IEEE rounding
(`tl.div_rn`; Triton's `/` is approximate in fp32) and is compiled without fused
multiply-adds, the twin's arithmetic step for step (the interpreter matches it bit for bit).
"""

from __future__ import annotations

import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the twin runs instead
    triton = None
    tl = None

HAVE_TRITON = triton is not None
_DIV_RN = HAVE_TRITON and hasattr(tl, "div_rn")  # absent only in Triton releases older than 3.0
BLOCK = 2048  # vocabulary columns per program: 75 programs a 151,936-token row, 16 values a thread


if HAVE_TRITON:

    @triton.jit
    def _penalize_kernel(logits_ptr, out_ptr, slots_ptr, params_ptr, counts_ptr, prompt_ptr, vocab,
                         stride_logits, stride_out, BLOCK: tl.constexpr, DIV_RN: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < vocab
        x = tl.load(logits_ptr + row * stride_logits + cols, mask=inside, other=0.0).to(tl.float32)
        slot = tl.load(slots_ptr + row)
        if slot >= 0:
            repetition = tl.load(params_ptr + row * 3)
            frequency = tl.load(params_ptr + row * 3 + 1)
            presence = tl.load(params_ptr + row * 3 + 2)
            count = tl.load(counts_ptr + slot * vocab + cols, mask=inside, other=0)
            in_prompt = tl.load(prompt_ptr + slot * vocab + cols, mask=inside, other=0)
            generated = count > 0
            if DIV_RN:
                shrunk = tl.div_rn(x, tl.zeros_like(x) + repetition)
            else:
                shrunk = x / repetition
            repeated = tl.where(x > 0, shrunk, x * repetition)
            x = tl.where(generated | (in_prompt != 0), repeated, x)
            x = x - frequency * count.to(tl.float32) - presence * generated.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, x, mask=inside)


def _check(logits: torch.Tensor, slots: torch.Tensor, params: torch.Tensor, counts: torch.Tensor,
           prompt_mask: torch.Tensor) -> None:
    rows, vocab = logits.shape
    if slots.shape != (rows,) or params.shape != (rows, 3):
        raise ValueError(f"slots {tuple(slots.shape)} and params {tuple(params.shape)} must be [{rows}] and "
                         f"[{rows}, 3] for logits of {rows} rows")
    if counts.shape[1] != vocab or prompt_mask.shape != counts.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and prompt_mask {tuple(prompt_mask.shape)} must be "
                         f"[slots, {vocab}] for logits of {vocab} columns")


def triton_penalize(logits: torch.Tensor, slots: torch.Tensor, params: torch.Tensor, counts: torch.Tensor,
                    prompt_mask: torch.Tensor) -> torch.Tensor:
    """The penalized logits (new fp32 tensor) by the fused kernel; see the module docstring.

    logits [rows, vocab] float; slots [rows] int64 (-1: no penalties); params [rows, 3] fp32
    (repetition, frequency, presence); counts [slots, vocab] int32; prompt_mask [slots, vocab] bool.
    """
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use penalize_twin")
    _check(logits, slots, params, counts, prompt_mask)
    rows, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    if rows == 0 or vocab == 0:
        return out
    _penalize_kernel[(rows, triton.cdiv(vocab, BLOCK))](
        logits, out, slots.contiguous(), params.contiguous(), counts.contiguous(),
        prompt_mask.contiguous().view(torch.uint8), vocab, logits.stride(0), out.stride(0),
        BLOCK=BLOCK, DIV_RN=_DIV_RN, num_warps=4, enable_fp_fusion=False)
    return out


def penalize_twin(logits: torch.Tensor, slots: torch.Tensor, params: torch.Tensor, counts: torch.Tensor,
                  prompt_mask: torch.Tensor) -> torch.Tensor:
    """`triton_penalize` in PyTorch (same arguments, same result, a new fp32 tensor)."""
    _check(logits, slots, params, counts, prompt_mask)
    logits = logits.float()
    wanted = slots >= 0
    on_cpu = logits.device.type == "cpu"
    rows = None  # None: every row, no gather and no copy back
    if on_cpu:  # on the CPU, finding the penalized rows waits for nothing
        index = wanted.nonzero().squeeze(1)
        if index.shape[0] < slots.shape[0]:
            rows = index
    # Elsewhere every row is computed and the unpenalized ones put back: finding them would sync.
    row_slots = (slots if rows is None else slots.index_select(0, rows)).clamp_min(0)
    row_params = params if rows is None else params.index_select(0, rows)
    repetition, frequency, presence = row_params[:, 0:1], row_params[:, 1:2], row_params[:, 2:3]
    row_counts = counts.index_select(0, row_slots)
    generated = row_counts > 0
    seen = generated | prompt_mask.index_select(0, row_slots)
    sub = logits if rows is None else logits.index_select(0, rows)
    factor = torch.where(seen, repetition, torch.ones_like(repetition))
    sub = torch.where(sub > 0, sub / factor, sub * factor)  # a new tensor: `logits` is never written
    sub = sub - frequency * row_counts.to(sub.dtype) - presence * generated.to(sub.dtype)
    if not on_cpu:
        return torch.where(wanted[:, None], sub, logits)
    return sub if rows is None else logits.index_copy(0, rows, sub)


_kernel_failure: str | None = None  # why the kernel could not be built here (then the twin runs)


def kernel_usable(logits: torch.Tensor) -> bool:
    return HAVE_TRITON and logits.is_cuda and _kernel_failure is None


def penalize(logits: torch.Tensor, slots: torch.Tensor, params: torch.Tensor, counts: torch.Tensor,
             prompt_mask: torch.Tensor) -> torch.Tensor:
    """The fused kernel on a GPU with Triton, the twin elsewhere. If the kernel cannot be
    built on this GPU/Triton (it compiles at first use), the twin takes over for the rest of
    the process with one warning, rather than failing every penalized request."""
    global _kernel_failure
    if kernel_usable(logits):
        try:
            return triton_penalize(logits, slots, params, counts, prompt_mask)
        except ValueError:
            raise  # wrong shapes: the caller's bug, the twin would refuse them too
        except Exception as error:  # noqa: BLE001 - a compiler or launch failure
            _kernel_failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            warnings.warn(f"the Triton penalties kernel failed ({_kernel_failure}); penalties run in PyTorch "
                          "from now on (same results, more passes over the logits)", RuntimeWarning, stacklevel=2)
    return penalize_twin(logits, slots, params, counts, prompt_mask)
