"""The fused penalty kernel against its twin (CPU: TRITON_INTERPRET=1) and both against vLLM's
formula written out per row: every element of a penalized row once, unpenalized rows copied,
the caller's logits never written, bad shapes refused by name."""

from __future__ import annotations

import os

import pytest
import torch

from thinkwise.kernels import triton_penalties as tp
from thinkwise.kernels.triton_penalties import penalize, penalize_twin, triton_penalize
from tests.engine.test_penalties import reference

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not tp.HAVE_TRITON, reason="triton is not installed")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Vocabularies below, at, just past and well past one program's BLOCK (masked tails).
VOCABS = [1, 37, tp.BLOCK, tp.BLOCK + 1, 3 * tp.BLOCK - 5]
# (repetition, frequency, presence); None: a row without penalties.
PARAMS = [(1.3, 0.5, 0.2), None, (0.7, -1.0, 2.0), (2.5, 0.0, 0.0), (1.0, 0.3, -0.4), None, (1.9, 2.0, 1.5)]
# Rows 0 and 4 share table slot 2 (two rows of one sequence, e.g. a redraw in one batch).
SLOTS = [2, -1, 0, 5, 2, -1, 1]


def interpret_or_skip():
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (the test suite's conftest does) to run Triton on CPU")


def case(vocab: int, device: str = "cpu", seed: int = 0):
    """Random logits (with +-inf and zeros), counts (mostly 0, repeats included) and prompt masks,
    and the (prompt, output) history each slot stands for, for the per-row reference."""
    generator = torch.Generator().manual_seed(seed)
    rows, slots = len(SLOTS), 6
    logits = torch.randn(rows, vocab, generator=generator) * 3
    logits[0, 0] = float("-inf")  # a banned id
    logits[2, -1] = 0.0
    counts = torch.randint(1, 4, (slots, vocab), generator=generator, dtype=torch.int32)
    counts *= torch.rand(slots, vocab, generator=generator) < 0.2
    prompt_mask = torch.rand(slots, vocab, generator=generator) < 0.1
    params = torch.tensor([p or (1.0, 0.0, 0.0) for p in PARAMS], dtype=torch.float32)
    slot_index = torch.tensor(SLOTS, dtype=torch.long)
    args = [t.to(device) for t in (logits, slot_index, params, counts.to(torch.int32), prompt_mask)]
    return args


def assert_kernel_matches(got, expected):
    if CUDA:  # compiled: IEEE division and no fused multiply-add, so equal to rounding at worst
        torch.testing.assert_close(got, expected, rtol=2e-7, atol=0)
    else:  # the interpreter computes with NumPy: bit for bit
        assert torch.equal(got, expected)


def per_row_reference(logits, slots, params, counts, prompt_mask):
    expected = []
    for row, slot in enumerate(slots.tolist()):
        if slot < 0:
            expected.append(logits[row])
            continue
        output = [t for t, c in enumerate(counts[slot].tolist()) for _ in range(c)]
        prompt = prompt_mask[slot].nonzero().squeeze(1).tolist()
        repetition, frequency, presence = params[row].tolist()
        expected.append(reference(logits[row], prompt, output, presence, frequency, repetition))
    return torch.stack(expected)


@pytest.mark.parametrize("vocab", VOCABS)
def test_twin_equals_vllm_formula_row_by_row(vocab):
    args = case(vocab)
    torch.testing.assert_close(penalize_twin(*args), per_row_reference(*[a.cpu() for a in args]))


@needs_triton
@pytest.mark.parametrize("vocab", VOCABS)
def test_kernel_gives_the_twins_bits(vocab):
    interpret_or_skip()
    device = "cuda" if CUDA else "cpu"
    args = case(vocab, device, seed=vocab)
    assert_kernel_matches(triton_penalize(*args), penalize_twin(*args))


@needs_triton
@pytest.mark.parametrize("function", [triton_penalize, penalize_twin])
def test_the_callers_logits_are_not_written_and_plain_rows_are_copied(function):
    interpret_or_skip()
    args = case(tp.BLOCK + 1, "cuda" if CUDA else "cpu")
    logits = args[0]
    before = logits.clone()
    out = function(*args)
    assert torch.equal(logits, before)  # the engine reads the raw logits again (DeepConf confidence)
    assert out.data_ptr() != logits.data_ptr() and out.dtype == torch.float32
    plain = [row for row, slot in enumerate(SLOTS) if slot < 0]
    assert torch.equal(out[plain], logits[plain])
    penalized = [row for row, slot in enumerate(SLOTS) if slot >= 0]
    assert not torch.equal(out[penalized], logits[penalized])


@pytest.mark.parametrize("function", [penalize_twin] + ([triton_penalize] if tp.HAVE_TRITON else []))
def test_every_row_penalized_still_gives_a_new_tensor(function):
    if function is triton_penalize:
        interpret_or_skip()
    logits, slots, *rest = case(40, "cuda" if CUDA else "cpu")
    slots = slots.clamp_min(3)  # no row without penalties: the twin skips its gather and copy back
    before = logits.clone()
    out = function(logits, slots, *rest)
    assert torch.equal(logits, before) and out.data_ptr() != logits.data_ptr()
    torch.testing.assert_close(out.cpu(), per_row_reference(before.cpu(), slots.cpu(), *[a.cpu() for a in rest]))


@needs_triton
def test_kernel_reads_bfloat16_and_strided_logits():
    interpret_or_skip()
    logits, *rest = case(50, "cuda" if CUDA else "cpu")
    wide = torch.zeros(logits.shape[0], 80, device=logits.device)
    wide[:, :50] = logits
    strided = wide[:, :50]  # row stride 80
    assert_kernel_matches(triton_penalize(strided, *rest), penalize_twin(logits, *rest))
    half = logits.bfloat16()
    assert_kernel_matches(triton_penalize(half, *rest), penalize_twin(half, *rest))


def test_penalize_runs_the_twin_off_the_gpu(monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton kernel ran for CPU tensors")

    monkeypatch.setattr(tp, "triton_penalize", fail)
    args = case(40)
    assert torch.equal(penalize(*args), penalize_twin(*args))


@pytest.mark.parametrize("function", [penalize_twin] + ([triton_penalize] if tp.HAVE_TRITON else []))
@pytest.mark.parametrize("broken, message", [
    (lambda a: [a[0], a[1][:-1], *a[2:]], "slots"),
    (lambda a: [a[0], a[1], a[2][:, :2], *a[3:]], "params"),
    (lambda a: [a[0], a[1], a[2], a[3][:, :-1], a[4]], "counts"),
    (lambda a: [*a[:4], a[4][:-1]], "prompt_mask"),
])
def test_mismatched_shapes_are_refused_by_name(function, broken, message):
    with pytest.raises(ValueError, match=message):
        function(*broken(case(30)))


@gpu_only
@needs_triton
def test_kernel_on_a_qwen_sized_batch():
    generator = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 64, 151_936
    logits = torch.randn(rows, vocab, device="cuda", generator=generator) * 4
    counts = (torch.rand(rows, vocab, device="cuda", generator=generator) < 0.01).to(torch.int32) * 3
    prompt_mask = torch.rand(rows, vocab, device="cuda", generator=generator) < 0.005
    slots = torch.arange(rows, device="cuda").flip(0)
    slots[::5] = -1
    params = torch.tensor([1.1, 0.3, 0.5], device="cuda").repeat(rows, 1)
    assert_kernel_matches(triton_penalize(logits, slots, params, counts, prompt_mask),
                          penalize_twin(logits, slots, params, counts, prompt_mask))


def test_a_kernel_that_cannot_be_built_hands_over_to_the_twin_once(monkeypatch):
    """A compiler failure at first use (say, an older Triton on the GPU) warns once and the
    twin serves that call and every later one, with the same result."""
    from thinkwise.kernels import triton_penalties as tp

    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError("PTX assembly failed\nlong log")

    monkeypatch.setattr(tp, "_kernel_failure", None)
    monkeypatch.setattr(tp, "HAVE_TRITON", True)
    monkeypatch.setattr(tp, "triton_penalize", failing)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    logits = torch.randn(2, 8)
    slots = torch.tensor([0, -1])
    params = torch.tensor([[1.3, 0.5, 0.25], [1.0, 0.0, 0.0]])
    counts = torch.zeros(1, 8, dtype=torch.int32)
    counts[0, 3] = 2
    prompt = torch.zeros(1, 8, dtype=torch.bool)
    with pytest.warns(RuntimeWarning, match="PTX assembly failed"):
        first = tp.penalize(logits, slots, params, counts, prompt)
    second = tp.penalize(logits, slots, params, counts, prompt)
    monkeypatch.undo()
    want = tp.penalize_twin(logits, slots, params, counts, prompt)
    assert torch.equal(first, want) and torch.equal(second, want) and len(calls) == 1
