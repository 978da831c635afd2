"""The 8-bit KV cache end to end on CPU (`kv_cache_dtype="fp8"`): greedy logits close to the
16/32-bit cache, the fp8 path deterministic under prefix caching, forks (copy-on-write),
preemption and chunked prefill, twice the blocks for the same memory, and hostile values refused."""

from __future__ import annotations

import pytest
import torch

from tests.logit_probes import RecordingSampler
from tests.tiny_models import make_tiny_model
from thinkwise import LLM, SamplingParams
from thinkwise.engine.config import EngineConfig, resolve_kv_cache_dtype
from thinkwise.errors import InvalidParameterError
from thinkwise.kernels.paged_attention import FP8KVCache

PROMPT = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90, 11]  # 11 tokens: 2 full blocks of 4 + a partial one
# Stated bound: the tiny random models' logits (|logit| <= ~0.65) move by at most this much
# when K/V are stored in e4m3 over 16 greedy steps (observed max |diff|: llama 0.009, qwen2
# 0.005, qwen3 0.019, mistral 0.010, gemma3 0.054 with its query_pre_attn_scalar).
LOGIT_BOUND = 0.05
WINDOWED_LOGIT_BOUND = 0.1


def greedy_logits(directory, kv_cache_dtype: str, steps: int = 16):
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64,
              kv_cache_dtype=kv_cache_dtype)
    recorder = RecordingSampler(llm.engine.sampler)
    llm.engine.sampler = recorder
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))[0]
    return out.outputs[0].token_ids, torch.cat(recorder.logits)


def test_fp8_greedy_logits_stay_close_to_the_full_precision_cache(tiny):
    _arch, directory, _ = tiny
    tokens, logits = greedy_logits(directory, "auto")
    tokens8, logits8 = greedy_logits(directory, "fp8")
    # Compare the steps up to the first differing token (after it the contexts differ).
    same = next((i for i, (a, b) in enumerate(zip(tokens, tokens8)) if a != b), len(tokens))
    assert same >= 4, (tokens, tokens8)
    diff = (logits[: same + 1] - logits8[: same + 1]).abs().max().item()
    assert 0 < diff < LOGIT_BOUND, diff  # > 0: the cache really is 8-bit


def test_fp8_outputs_do_not_depend_on_caching_forks_preemption_or_chunking(tiny_llama):
    """The fp8 path is deterministic: the same requests give the same tokens with prefix
    caching hits, forked samples (copy-on-write of a shared partial block), forced preemption
    and chunked prefill as without any of them."""
    directory, _ = tiny_llama
    params = [SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=9, max_tokens=24, ignore_eos=True)]
    prompts = [PROMPT, PROMPT + [12, 13, 14, 15, 16], [256] + list(range(100, 120))]
    plain = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512,
                enable_prefix_caching=False, kv_cache_dtype="fp8")
    expected = [[o.token_ids for o in r.outputs] for r in plain.generate(prompts, params)]
    busy = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=24,
               max_num_batched_tokens=8, kv_cache_dtype="fp8")
    busy.generate(PROMPT, SamplingParams(max_tokens=1))  # fills the prefix cache with PROMPT's blocks
    results = busy.generate(prompts, params)
    assert [[o.token_ids for o in r.outputs] for r in results] == expected
    assert busy.engine.scheduler.num_preemptions > 0
    assert sum(r.counts.prompt_tokens_cached for r in results) > 0
    # And greedy forks equal the single greedy sample (every fork's copied blocks keep their scales).
    single = busy.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    forks = busy.generate(PROMPT, SamplingParams(n=3, temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert all(o.token_ids == single.outputs[0].token_ids for o in forks.outputs)


def test_copy_on_write_moves_codes_and_scales(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=16, kv_cache_dtype="fp8")
    runner = llm.engine.runner
    assert isinstance(runner.kv_caches[0][0], FP8KVCache) and runner.kv_cache.dtype == torch.float8_e4m3fn
    runner.kv_cache.view(torch.uint8)[:, :, 3] = 7
    runner.kv_scales[:, :, 3] = 0.5
    runner.copy_blocks([(3, 9)])
    assert (runner.kv_cache.view(torch.uint8)[:, :, 9] == 7).all() and (runner.kv_scales[:, :, 9] == 0.5).all()
    # The per-layer views see the copy too (they are views, not copies).
    assert (runner.kv_caches[1][1].scales[9] == 0.5).all()


def test_fp8_doubles_the_blocks_for_the_same_memory(tiny_llama):
    directory, _ = tiny_llama
    budget = dict(device="cpu", block_size=4, kv_cache_memory_gb=0.002)
    bf16 = LLM(str(directory), dtype="bfloat16", **budget).engine
    fp8 = LLM(str(directory), dtype="bfloat16", kv_cache_dtype="fp8", **budget).engine
    config = bf16.model_config
    layers_heads = 2 * config.num_layers * config.num_kv_heads
    assert bf16.cost_spec.kv_bytes_per_token == layers_heads * config.head_dim * 2
    assert fp8.cost_spec.kv_bytes_per_token == layers_heads * (config.head_dim + 4)  # codes + fp32 scale
    budget_bytes = int(0.002 * (1 << 30))
    assert bf16.block_manager.num_blocks == budget_bytes // (bf16.cost_spec.kv_bytes_per_token * 4)
    assert fp8.block_manager.num_blocks == budget_bytes // (fp8.cost_spec.kv_bytes_per_token * 4)
    # 2 x head_dim / (head_dim + 4): 1.78x at this tiny head_dim 16... 1.94x at 128 (tests/cost).
    ratio = fp8.block_manager.num_blocks / bf16.block_manager.num_blocks
    assert ratio == pytest.approx(2 * config.head_dim / (config.head_dim + 4), rel=0.01)
    # The allocation matches what was budgeted: codes and scales within the budget.
    runner = fp8.runner
    used = runner.kv_cache.numel() + runner.kv_scales.numel() * 4
    assert used <= budget_bytes + fp8.cost_spec.kv_bytes_per_token * 4  # + the scratch block
    assert fp8.run_metadata["kv_cache_dtype"].startswith("fp8_e4m3")
    assert bf16.run_metadata["kv_cache_dtype"] == "torch.bfloat16"


@pytest.mark.parametrize("value", ["fp8_e5m2", "FP8", "", "int8", "bfloat16", None, 8, ["fp8"]])
def test_unknown_kv_cache_dtypes_are_refused(value, tiny_llama):
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype .* is not one of auto, fp8, fp8_e4m3") as error:
        EngineConfig(kv_cache_dtype=value)
    assert error.value.param == "kv_cache_dtype"
    directory, _ = tiny_llama
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype"):
        LLM(str(directory), device="cpu", kv_cache_dtype=value)


def test_fp8_on_a_gpu_without_fp8_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(InvalidParameterError, match=r"compute capability 8.9.*8\.0.*kv_cache_dtype='auto'") as error:
        resolve_kv_cache_dtype("fp8", torch.device("cuda"), torch.bfloat16)
    assert error.value.param == "kv_cache_dtype"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.device("cuda"), torch.bfloat16) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("auto", torch.device("cuda"), torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_fp8_with_sliding_window_models(arch, tmp_path):
    """Windowed layers (Mistral; Gemma 3's local layers) read the fp8 cache too."""
    make_tiny_model(arch, tmp_path)
    tokens, logits = greedy_logits(tmp_path, "auto")
    tokens8, logits8 = greedy_logits(tmp_path, "fp8")
    same = next((i for i, (a, b) in enumerate(zip(tokens, tokens8)) if a != b), len(tokens))
    assert same >= 4, (tokens, tokens8)
    assert 0 < (logits[: same + 1] - logits8[: same + 1]).abs().max().item() < WINDOWED_LOGIT_BOUND


@pytest.mark.parametrize("factor", [4096.0, 1 / 4096])
def test_fp8_keeps_keys_and_values_far_outside_e4m3s_range(factor, tmp_path):
    """The same function with K and V projections scaled by `factor` (q and o by 1/factor):
    keys and values of ~4,000 (real models' attention-sink keys give raw q.k ~ 9,700) or of
    ~1e-4 are far past e4m3's 448 or below its normals (2^-6). The per-token scale absorbs
    both, so fp8 stays as close to the full-precision cache as unscaled; a fixed scale would
    saturate the first and flush the second."""
    model = make_tiny_model("llama", tmp_path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(factor)
            layer.self_attn.q_proj.weight.div_(factor)
            layer.self_attn.v_proj.weight.mul_(factor)
            layer.self_attn.o_proj.weight.div_(factor)
    model.save_pretrained(tmp_path)
    tokens, logits = greedy_logits(tmp_path, "auto")
    tokens8, logits8 = greedy_logits(tmp_path, "fp8")
    assert tokens8 == tokens
    assert (logits - logits8).abs().max().item() < LOGIT_BOUND


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 (compute capability 8.9+)")
@pytest.mark.parametrize("fused", [True, False])
def test_fp8_on_gpu_with_graphs_cascade_and_either_cache_write(tiny_llama, fused):
    """On the GPU: CUDA graphs + cascade attention over the forks' shared prompt give the same
    samples as eager decode without cascade, with the fused kernel's fp8 write or the twin's."""
    directory, _ = tiny_llama
    common = dict(device="cuda", dtype="float32", block_size=4, num_kv_blocks=512, kv_cache_dtype="fp8",
                  fused_kernels=fused)
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=30, ignore_eos=True)
    prompt = [256] + list(range(30, 60))  # 31 tokens: 7 full blocks shared by the four samples
    graphed = LLM(str(directory), cascade_min_shared_tokens=4, **common)
    eager = LLM(str(directory), cuda_graphs=False, cascade_min_shared_tokens=None, **common)
    got = [o.token_ids for o in graphed.generate(prompt, params)[0].outputs]
    assert graphed.engine.runner.graph_decoder.graphs  # decode steps really replayed graphs
    assert got == [o.token_ids for o in eager.generate(prompt, params)[0].outputs]
    tokens, _ = greedy_logits(directory, "fp8")  # the CPU path
    gpu = LLM(str(directory), **common).generate(PROMPT, SamplingParams(temperature=0, max_tokens=16,
                                                                         ignore_eos=True))[0].outputs[0].token_ids
    assert gpu[:4] == tokens[:4]
