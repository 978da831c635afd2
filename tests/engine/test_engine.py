"""Engine behaviour on a tiny model: fork/n, abort, prefix reuse, seeds, stops, errors."""

from __future__ import annotations

import pytest

from thinkwise import LLM, SamplingParams
from thinkwise.errors import CapacityError, InvalidParameterError, PromptTooLongError
from tests.tiny_models import EOS_ID


@pytest.fixture()
def llm(tiny_llama):
    directory, _ = tiny_llama
    return LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=128)


def assert_no_leak(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(count == 0 for count in bm.ref_counts)
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


PROMPT = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90, 11]  # 11 tokens: 2 full blocks of 4 + a partial one


def test_n_samples_share_one_prefill(llm):
    out = llm.generate(PROMPT, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))[0]
    assert len(out.outputs) == 4 and [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert out.counts.prompt_tokens_computed == len(PROMPT)  # once, not 4 times
    assert out.counts.generated_tokens == 4 * 12
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # different seeds, different samples
    assert_no_leak(llm)


def test_greedy_forks_equal_a_single_greedy_sample(llm):
    single = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    many = llm.generate(PROMPT, SamplingParams(n=3, temperature=0, max_tokens=16, ignore_eos=True))[0]
    # Copy-on-write keeps every fork's cache intact: all equal the single sample.
    assert all(o.token_ids == single.outputs[0].token_ids for o in many.outputs)


def test_fork_shares_prompt_blocks(llm):
    engine = llm.engine
    request = engine.add_request(PROMPT, SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=20))
    engine.step()  # prefill + first token for all four
    seqs = request.sequences
    assert len(seqs) == 4
    bm = engine.block_manager
    first_two = seqs[0].block_table[:2]
    assert all(s.block_table[:2] == first_two for s in seqs)
    assert all(bm.ref_counts[b] == 4 for b in first_two)
    assert bm.num_used_blocks == 3  # nothing copied yet
    engine.step()  # each writes its first token into the shared partial block: copy-on-write
    assert bm.num_used_blocks == 3 + 3
    engine.abort(request.request_id)
    assert_no_leak(llm)


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    request = engine.add_request(PROMPT, SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    output = engine.abort(request.request_id)
    assert all(o.finish_reason == "abort" for o in output.outputs)
    assert_no_leak(llm)
    assert not engine.has_unfinished_requests()


def test_abort_one_sample_keeps_the_others(llm):
    engine = llm.engine
    request = engine.add_request(PROMPT, SamplingParams(n=3, seed=3, max_tokens=10, ignore_eos=True))
    engine.step()
    engine.abort_sequence(request.sequences[1])
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step().finished
    output = finished[0]
    assert [o.finish_reason for o in output.outputs] == ["length", "abort", "length"]
    assert len(output.outputs[0].token_ids) == 10
    assert_no_leak(llm)


def test_second_request_with_same_prefix_reports_cached_tokens(llm):
    first = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4))[0]
    assert first.counts.prompt_tokens_cached == 0
    second = llm.generate(PROMPT[:9] + [99, 98, 97], SamplingParams(temperature=0, max_tokens=4))[0]
    assert second.counts.prompt_tokens_cached == 8  # two full blocks of 4
    assert second.counts.prompt_tokens_computed == 12 - 8
    assert_no_leak(llm)


def test_prefix_cache_does_not_change_outputs(llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    cold = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    warm = llm.generate(PROMPT, params)[0]
    assert warm.counts.prompt_tokens_cached > 0
    assert warm.outputs[0].token_ids == cold


def test_a_prompt_reuses_kv_only_under_its_own_prefix(llm):
    # A and B share two middle blocks (Q) after different heads; C = B's head + Q. C's warm
    # run must equal its cold run: reusing Q's KV computed after A's head would change it.
    head_a, head_b, q = [256] + list(range(1, 8)), [256] + list(range(101, 108)), list(range(30, 38))
    prompt_a, prompt_b, prompt_c = head_a + q + [60, 61], head_b + q + [62, 63], head_b + q + [64, 65]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cold = llm.generate(prompt_c, params)[0].outputs[0].token_ids
    llm.engine.block_manager.reset_prefix_cache()
    llm.generate(prompt_a, params)
    assert llm.generate(prompt_b, params)[0].counts.prompt_tokens_cached == 0
    warm = llm.generate(prompt_c, params)[0]
    assert warm.counts.prompt_tokens_cached == 16  # B's head and Q, four blocks of 4
    assert warm.outputs[0].token_ids == cold
    assert_no_leak(llm)


def test_forced_hash_collisions_change_no_output(llm, monkeypatch):
    from thinkwise.engine import block_manager

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    other = [256] + list(range(120, 135))
    cold = llm.generate(other, params)[0].outputs[0].token_ids
    llm.engine.block_manager.reset_prefix_cache()
    monkeypatch.setattr(block_manager, "chain_hash", lambda previous, tokens: 7)  # every block collides
    llm.generate(PROMPT, params)
    warm = llm.generate(other, params)[0]
    assert warm.counts.prompt_tokens_cached == 0
    assert warm.outputs[0].token_ids == cold
    assert_no_leak(llm)


def test_same_seed_same_output_whatever_the_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    mates = [[256, 3, 4], [256] + list(range(100, 130)), [256, 9] * 5]
    batched = llm.generate(
        [mates[0], PROMPT, mates[1], mates[2]],
        [SamplingParams(temperature=1.0, max_tokens=30), params, SamplingParams(temperature=0.5, max_tokens=5),
         SamplingParams(n=3, temperature=1.0, max_tokens=40)],
    )[1].outputs[0].token_ids
    assert batched == alone
    again = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    assert again == alone
    other_seed = llm.generate(PROMPT, SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=24,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_same_seed_survives_preemption(tiny_llama):
    directory, _ = tiny_llama
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    roomy = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    tight = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=20)
    prompts = [PROMPT, [256, 1, 2, 3], [256] + list(range(30, 45)), [256, 77, 78]]
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert_no_leak(tight)


def test_stop_conditions(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    # max tokens
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 20
    # stop token id: stop at the 5th generated token
    stop_id = greedy.token_ids[4]
    first = greedy.token_ids.index(stop_id)
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id],
                                              ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id and len(out.token_ids) == first + 1
    # stop string: cut the text where it starts
    text = greedy.text
    assert len(text) >= 6
    stop = text[3:6]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True,
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_min_tokens_equal_to_max_tokens_fills_the_budget_without_a_stop_token(llm):
    # This random model rarely emits EOS, so EOS stopping, ignore_eos and the min_tokens bans
    # are checked on a model biased towards EOS in test_stop_rules.py.
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, min_tokens=6,
                                              stop_token_ids=[EOS_ID]))[0].outputs[0]
    assert len(out.token_ids) == 6 and EOS_ID not in out.token_ids
    assert out.finish_reason == "length"
    assert EOS_ID in llm.engine.eos_token_ids


def test_logprobs(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert entry["token_id"] == token
        assert len(entry["top"]) == 3
        assert entry["top"][0][0] == token  # greedy picks the most likely token
        assert entry["logprob"] == pytest.approx(entry["top"][0][1])
    assert out.cumulative_logprob == pytest.approx(sum(e["logprob"] for e in out.logprobs))


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3))[0]
    expected = llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert out.prompt_token_ids == expected
    two = llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                   SamplingParams(max_tokens=2))
    assert len(two) == 2


@pytest.mark.parametrize(
    "kwargs, param",
    [({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"), ({"top_k": -5}, "top_k"), ({"min_p": 2.0}, "min_p"),
     ({"logprobs": 50}, "logprobs")],
)
def test_bad_sampling_parameters_are_named(kwargs, param):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)


def test_prompt_longer_than_context(llm):
    too_long = [5] * llm.engine.max_model_len
    with pytest.raises(PromptTooLongError, match="shorten the prompt"):
        llm.generate(too_long, SamplingParams(max_tokens=1))
    # Nothing was queued and the engine still works.
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(PROMPT, SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_bad_prompt_in_a_batch_loses_no_work(llm):
    with pytest.raises(InvalidParameterError):
        llm.generate([PROMPT, [256, 10_000]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidParameterError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))


def test_prompt_larger_than_the_kv_cache(tiny_llama):
    directory, _ = tiny_llama
    small = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=2)
    with pytest.raises(CapacityError, match="--kv-blocks"):
        small.generate([5] * 20, SamplingParams(max_tokens=1))


def test_force_tokens(llm):
    """Forced tokens count toward max_tokens and appear in the text."""
    engine = llm.engine
    request = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    engine.step()
    seq = request.sequences[0]
    forced = llm.tokenizer.encode("ABC", add_special_tokens=False)
    assert len(forced) == 3
    engine.force_tokens(seq, forced)
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step().finished
    out = finished[0]
    assert out.outputs[0].token_ids[1:4] == forced
    assert len(out.outputs[0].token_ids) == 14
    assert out.counts.forced_tokens == 3
    assert "ABC" in out.outputs[0].text
