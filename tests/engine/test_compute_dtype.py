"""LayerCast (`compute_dtype="float32"` with 16-bit weights): storage, numerics, reproducibility.

Weights stay 16-bit in memory and are upcast at each matmul; norms, softmax, attention
and the KV cache are fp32. The claims checked here: the logits equal an fp32 model whose
weights were rounded to bf16; a seeded request gives the same tokens whatever else is
batched with it and in another process; bad values are refused naming the option.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thinkwise import LLM, SamplingParams
from thinkwise.errors import InvalidParameterError
from thinkwise.kernels.linear_dispatch import DispatchLinear

PROMPT = [256, 5, 9, 77, 31, 2, 200, 45, 45, 8, 19]
OTHERS = [[256, 40, 41], [256] + list(range(60, 90)), [256, 7, 7, 7, 7, 7, 7], [256, 150, 151, 152, 153, 154]]
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=40, ignore_eos=True)


def _layercast(directory, **options) -> LLM:
    options.setdefault("block_size", 4)
    options.setdefault("compute_dtype", "float32")
    return LLM(str(directory), dtype="bfloat16", device="cpu", **options)


def test_weights_stay_16_bit_and_everything_else_is_fp32(tiny):
    _arch, directory, _reference = tiny
    engine = _layercast(directory).engine
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, DispatchLinear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    assert engine.runner.kv_cache.dtype == torch.float32
    assert engine.run_metadata["dtype"] == "torch.bfloat16"
    assert engine.run_metadata["compute_dtype"] == "torch.float32"
    assert engine.cost_spec.element_bytes == 2 and engine.cost_spec.kv_bytes_per_token % 4 == 0
    assert all(m.blas_weight is None for m in linears)  # no fp32 copy of any weight is kept


def test_logits_equal_fp32_model_with_bf16_rounded_weights(tiny):
    _arch, directory, reference = tiny
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for param in rounded.parameters():  # every tensor is loaded in bf16, norms included
            param.copy_(param.bfloat16().float())
    llm = _layercast(directory)
    engine = llm.engine
    request = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=1))
    batch = engine.scheduler.schedule()
    runner = engine.runner
    inputs, positions, metadata, _ = runner.prepare(batch.sequences, batch.num_new_tokens)
    with torch.inference_mode():
        ours = runner.model.compute_logits(runner.model(inputs, positions, runner.kv_caches, metadata))
        theirs = rounded(torch.tensor([PROMPT])).logits[0].float()
    engine.abort(request.request_id)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_seeded_sample_is_the_same_alone_and_batched(tiny):
    _arch, directory, _reference = tiny
    llm = _layercast(directory)
    alone = llm.generate([PROMPT], SEEDED)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.9, seed=i, max_tokens=30 + 3 * i, ignore_eos=True) for i in range(4)]
    batched = llm.generate(OTHERS[:2] + [PROMPT] + OTHERS[2:], others[:2] + [SEEDED] + others[2:])
    assert batched[2].outputs[0].token_ids == alone
    forked = llm.generate([PROMPT], SamplingParams(n=4, temperature=1.0, top_p=0.95, seed=1234, max_tokens=40,
                                                   ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in forked.outputs}) > 1  # really sampled: the samples differ
    assert len(alone) == 40


_CHILD = """
import json, sys
import thinkwise, torch
from thinkwise import LLM, SamplingParams
torch.set_num_threads(int(sys.argv[2]))
llm = LLM(sys.argv[1], dtype="bfloat16", compute_dtype="float32", device="cpu", block_size=4)
prompts = [{prompts}][: int(sys.argv[3])]
params = [SamplingParams(temperature=1.0, top_p=0.95, seed=1234 + i, max_tokens=40, ignore_eos=True)
          for i in range(len(prompts))]
print(json.dumps([o.outputs[0].token_ids for o in llm.generate(prompts, params)][0]))
"""


def test_seeded_sample_is_the_same_in_another_process(tiny, tmp_path):
    """Two fresh processes, one with 1 thread and the prompt alone, one with 2 threads and the
    prompt batched with others: the same tokens. (No start-up GEMM table can differ: LayerCast
    runs one matmul implementation at every batch size.)"""
    _arch, directory, _reference = tiny
    script = tmp_path / "child.py"
    script.write_text(_CHILD.replace("{prompts}", ", ".join(repr(p) for p in [PROMPT] + OTHERS)))
    root = str(Path(__file__).resolve().parents[2])
    runs = []
    for threads, count in (("1", "1"), ("2", "5")):
        done = subprocess.run([sys.executable, str(script), str(directory), threads, count], capture_output=True,
                              text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))})
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] and len(runs[0]) == 40


def test_bad_compute_dtype_is_refused_naming_the_option(tiny):
    _arch, directory, _reference = tiny
    with pytest.raises(InvalidParameterError, match="compute_dtype") as info:
        _layercast(directory, compute_dtype="float64")
    assert info.value.param == "compute_dtype"
    with pytest.raises(InvalidParameterError, match="narrower"):
        LLM(str(directory), dtype="float32", compute_dtype="bfloat16", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_layercast_on_gpu_with_cuda_graphs_is_batch_invariant(tiny):
    _arch, directory, _reference = tiny
    llm = LLM(str(directory), dtype="bfloat16", compute_dtype="float32", device="cuda", block_size=4)
    assert llm.engine.runner.graph_decoder is not None and llm.engine.runner.kv_cache.dtype == torch.float32
    alone = llm.generate([PROMPT], SEEDED)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.9, seed=i, max_tokens=30 + 3 * i, ignore_eos=True) for i in range(4)]
    batched = llm.generate(OTHERS[:2] + [PROMPT] + OTHERS[2:], others[:2] + [SEEDED] + others[2:])
    assert batched[2].outputs[0].token_ids == alone and len(alone) == 40
