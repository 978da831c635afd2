"""Cost attribution on the tiny Llama equals a hand computation from its config."""

from __future__ import annotations

import pytest
import torch

from thinkwise import LLM, SamplingParams
from thinkwise.cost import ModelCostSpec, ProfiledRun, RuntimeModel, effective_flops
from thinkwise.cost.hardware import EnergyMeter, device_intensity
from thinkwise.strategies.base import StrategyCost

# tests/tiny_models.py: vocab 260, hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads,
# head_dim 16, untied lm_head; fp32 here.
DENSE = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128)  # qkv + o + gate/up/down, both layers = 73,728
LM_HEAD_FLOPS = 2 * 64 * 260
ATTENTION_PER_PAIR = 4 * 2 * 4 * 16  # QK^T + PV, 2 layers x 4 heads x head_dim 16
WEIGHT_BYTES = 4 * (DENSE + 2 * 2 * 64 + 64 + 2 * 260 * 64)  # + norms + embedding + lm_head
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, fp32


@pytest.fixture()
def llm(tiny_llama):
    directory, _ = tiny_llama
    return LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64,
               enable_prefix_caching=False)


def test_spec_matches_the_model(llm, tiny_llama):
    _, reference = tiny_llama
    spec = ModelCostSpec.from_config(llm.engine.runner.config, torch.float32)
    assert spec.dense_params == DENSE
    assert spec.weight_bytes == WEIGHT_BYTES == 4 * sum(p.numel() for p in reference.parameters())
    assert spec.kv_bytes_per_token == KV_PER_TOKEN


def step(new_tokens: int, end: int, sampled: bool = True) -> float:
    pairs = sum(range(end - new_tokens + 1, end + 1))
    return 2 * DENSE * new_tokens + ATTENTION_PER_PAIR * pairs + (LM_HEAD_FLOPS if sampled else 0)


def test_one_request_by_hand(llm):
    out = llm.generate([256, 1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    counts = out.counts
    # Step 1: prefill of 5 tokens (sampled); steps 2-4: one token each at contexts 6, 7, 8.
    assert counts.flops == step(5, 5) + step(1, 6) + step(1, 7) + step(1, 8)
    assert counts.bytes_weights == 4 * WEIGHT_BYTES
    assert counts.bytes_kv == KV_PER_TOKEN * ((5 + 5) + (6 + 1) + (7 + 1) + (8 + 1))
    assert counts.device_time_s == 0.0 and counts.energy_j is None  # CPU: no GPU timer or energy counter


def test_weights_split_over_the_batch(llm):
    outs = llm.generate([[256, 1, 2], [256, 5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    a, b = (o.counts for o in outs)
    # Both run in the same three steps: each carries half the weights of each step.
    assert a.bytes_weights == b.bytes_weights == 3 * WEIGHT_BYTES / 2
    assert a.flops == step(3, 3) + step(1, 4) + step(1, 5)
    assert b.flops == step(4, 4) + step(1, 5) + step(1, 6)


def test_forked_samples_count_the_prompt_once(llm):
    out = llm.generate([256, 1, 2, 3, 4, 5, 6, 7], SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=2,
                                                                   ignore_eos=True))[0]
    # One prefill (8 tokens, sampled), then three samples decode one token each at context 9.
    assert out.counts.flops == step(8, 8) + 3 * step(1, 9)


def test_effective_flops_and_strategy_sum(llm):
    assert effective_flops(10.0, 4.0, 2.5) == 20.0
    intensity, source = device_intensity("cpu")
    assert intensity > 0 and source == "measured on this CPU"
    assert not EnergyMeter("cpu").available
    out = llm.generate([256, 1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    cost = StrategyCost()
    cost.add(out.counts, 2.0)
    cost.add(out.counts, 2.0)
    moved = out.counts.bytes_weights + out.counts.bytes_kv
    assert cost.flops == 2 * out.counts.flops and cost.bytes_moved == 2 * moved
    assert cost.effective_flops == 2 * (out.counts.flops + 2.0 * moved)
    assert cost.energy_j is None


def test_runtime_model_recovers_a_known_law():
    truth = RuntimeModel(0.05, 0.001, 0.02)
    runs = [ProfiledRun(p, o, truth.predict(p, o)) for p in (10, 50, 200) for o in (1, 8, 32)]
    fitted = RuntimeModel.fit(runs)
    assert fitted.per_output_token_s == pytest.approx(0.02) and fitted.per_prompt_token_s == pytest.approx(0.001)
    noisy = [ProfiledRun(r.prompt_tokens, r.output_tokens, r.seconds * 1.1) for r in runs]
    assert fitted.error_on(noisy) == pytest.approx(100 * (1 - 1 / 1.1), rel=1e-6)
    with pytest.raises(ValueError):
        RuntimeModel.fit(runs[:2])
