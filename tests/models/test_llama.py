"""thinkwise's Llama-family model against transformers on tiny random configs (fp32)."""

from __future__ import annotations

import torch

from thinkwise import LLM, SamplingParams
from tests.logit_probes import RecordingSampler
from tests.models import model_checks
from tests.tiny_models import reference_greedy

PROMPTS = [
    *model_checks.PROMPTS,  # the shared model checks' prompts, then two more
    [256, 80, 81, 82, 83, 84, 85, 86],
    [256, 200, 150, 100, 50, 25, 12, 6, 3, 1, 0, 2, 4, 8, 16, 32, 64, 128],
]


def make_llm(directory, **options) -> LLM:
    options.setdefault("dtype", "float32")
    options.setdefault("device", "cpu")
    options.setdefault("block_size", 4)
    return LLM(str(directory), **options)


def test_prefill_logits_match_transformers(tiny):
    arch, directory, reference = tiny
    llm = make_llm(directory)
    engine = llm.engine
    prompt = PROMPTS[0]
    request = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
    batch = engine.scheduler.schedule()
    runner = engine.runner
    inputs, positions, metadata, _ = runner.prepare(batch.sequences, batch.num_new_tokens)
    with torch.inference_mode():
        hidden = runner.model(inputs, positions, runner.kv_caches, metadata)
        ours = runner.model.compute_logits(hidden)
        theirs = reference(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    engine.abort(request.request_id)


def test_32_decode_steps_match_transformers(tiny):
    arch, directory, reference = tiny
    llm = make_llm(directory)
    recorder = RecordingSampler(llm.engine.sampler)
    llm.engine.sampler = recorder
    prompt = PROMPTS[2]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=33, ignore_eos=True))[0]
    tokens = out.outputs[0].token_ids
    assert len(tokens) == 33
    with torch.no_grad():
        full = reference(torch.tensor([prompt + tokens])).logits[0].float()
    # Step t's logits (t = 0 is the prefill) predict token t from prompt + tokens[:t].
    for step, logits in enumerate(recorder.logits):
        expected = full[len(prompt) - 1 + step]
        assert (logits[0] - expected).abs().max().item() <= 1e-4, f"{arch}: step {step} differs"
    assert len(recorder.logits) == 33


def test_greedy_batch_matches_transformers(tiny):
    arch, directory, reference = tiny
    llm = make_llm(directory)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference_greedy(reference, prompt, 32), f"{arch}: {prompt}"


def test_greedy_with_requests_joining_mid_run(tiny):
    arch, directory, reference = tiny
    engine = make_llm(directory).engine
    params = SamplingParams(temperature=0, max_tokens=32)
    finished = {}
    ids = [engine.add_request(p, params).request_id for p in PROMPTS[:3]]
    pending = list(PROMPTS[3:])
    steps = 0
    while engine.has_unfinished_requests() or pending:
        if pending and steps % 3 == 2:  # a new request every few steps, while others decode
            ids.append(engine.add_request(pending.pop(0), params).request_id)
        for output in engine.step().finished:
            finished[output.request_id] = output
        steps += 1
    for request_id, prompt in zip(ids, PROMPTS):
        assert finished[request_id].outputs[0].token_ids == reference_greedy(reference, prompt, 32)


def test_greedy_under_forced_preemption(tiny):
    arch, directory, reference = tiny
    # 8 sequences of up to 23 + 32 tokens need ~14 blocks of 4 each; 24 blocks force preemption.
    llm = make_llm(directory, num_kv_blocks=24)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32))
    engine = llm.engine
    assert engine.scheduler.num_preemptions > 0
    assert any(o.counts.recomputed_tokens > 0 for o in outputs)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference_greedy(reference, prompt, 32)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_chunked_prefill_matches(tiny_llama):
    directory, reference = tiny_llama
    llm = make_llm(directory, max_num_batched_tokens=5)
    outputs = llm.generate(PROMPTS[:4], SamplingParams(temperature=0, max_tokens=16))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference_greedy(reference, prompt, 16)


def test_tied_embeddings_and_llama3_rope(tmp_path):
    from tests.tiny_models import make_tiny_model

    reference = make_tiny_model(
        "llama", tmp_path, seed=3, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    llm = make_llm(tmp_path)
    outputs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=24))
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference_greedy(reference, prompt, 24)
