"""A strategy's cost is the sum of its engine requests' counts, bytes priced as effective FLOPs."""

from __future__ import annotations

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.cost import effective_flops
from thinkwise.engine.sequence import TokenCounts
from thinkwise.strategies.base import StrategyCost


def test_strategy_cost_sums_requests_and_prices_bytes():
    a = TokenCounts(prompt_tokens=5, generated_tokens=4, aborted_tokens=2, flops=100.0, bytes_weights=30.0,
                    bytes_kv=10.0, device_time_s=0.5, energy_j=2.0)
    b = TokenCounts(prompt_tokens=5, generated_tokens=6, flops=50.0, bytes_weights=20.0, bytes_kv=4.0,
                    device_time_s=0.25, energy_j=1.0)
    cost = StrategyCost()
    cost.add(a, 2.0)
    cost.add(b, 2.0)
    assert (cost.requests, cost.decode_tokens, cost.aborted_tokens) == (2, 10, 2)
    assert (cost.flops, cost.bytes_weights, cost.bytes_kv, cost.bytes_moved) == (150.0, 50.0, 14.0, 64.0)
    assert cost.effective_flops == effective_flops(150.0, 64.0, 2.0) == 278.0
    assert (cost.device_time_s, cost.energy_j) == (0.75, 3.0)


def test_energy_stays_unavailable_when_no_request_measured_it(tiny_llama):
    directory, _ = tiny_llama
    llm = LLM(str(directory), dtype="float32", device="cpu", num_kv_blocks=64)
    out = llm.generate([256, 1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    cost = StrategyCost()
    cost.add(out.counts, 3.0)
    cost.add(out.counts, 3.0)
    moved = out.counts.bytes_weights + out.counts.bytes_kv
    assert cost.flops == 2 * out.counts.flops > 0 and cost.bytes_moved == pytest.approx(2 * moved)
    assert cost.effective_flops == pytest.approx(2 * (out.counts.flops + 3.0 * moved))
    assert cost.energy_j is None and cost.device_time_s == 0.0
