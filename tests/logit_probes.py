"""Probes for the logits an engine computes: what the sampler saw at each step, and what one
prefill of a whole sequence gives at every position (the reference a decode step must match)."""

from __future__ import annotations

import torch

from thinkwise import SamplingParams


class RecordingSampler:
    """Wraps an engine's sampler and keeps every logits matrix it is called with (one row per
    sampled sequence); anything else the engine asks of its sampler goes to the wrapped one."""

    def __init__(self, inner):
        self.inner = inner
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits, rows):
        self.logits.append(logits.float().clone())
        return self.inner(logits, rows)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def prefill_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits at every position of `ids` from one prefill step of `engine` (which must not find
    them in its prefix cache, nor chunk them), in fp32 on the CPU."""
    request = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=1))
    batch = engine.scheduler.schedule()
    assert batch.num_new_tokens == [len(ids)], "the prefill was cached or chunked"
    runner = engine.runner
    inputs, positions, metadata, _ = runner.prepare(batch.sequences, batch.num_new_tokens)
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(inputs, positions, runner.kv_caches, metadata))
    engine.abort(request.request_id)
    return logits.float().cpu()
