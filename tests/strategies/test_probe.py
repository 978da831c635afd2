"""Answer probing (Dynasor-CoT) on a tiny Llama with scripted logits: forks counted and freed, chains stopped.

Chains see peaked logits on a filler letter and would think until max_tokens; probes
(sample indices >= k, so their seeds are known) are scripted to answer "7}" (or to
disagree, or to hesitate). The engine's `fork` is wrapped to count the probes it made.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.strategies.scripted_logits import ScriptedLogitsSampler
from thinkwise import LLM, SamplingParams
from thinkwise.engine.async_engine import AsyncEngine
from thinkwise.errors import InvalidParameterError
from thinkwise.strategies import LocalBackend, parse_strategy, run_strategy
from thinkwise.strategies.probe import DEFAULT_CUE, probe_answer, settled
from thinkwise.strategies.remote import RemoteBackend

PROMPT = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90, 11]
SEED = 9
MAX_TOKENS = 120


def test_probe_answers_and_agreement():
    assert probe_answer("42} and more") == "42"
    assert probe_answer("\\frac{1}{2}}") == "\\frac{1}{2}"
    assert probe_answer("42") is None  # never closed: cut off
    assert probe_answer("} x") is None  # empty
    assert probe_answer("wait, 4}") is None and probe_answer("Hmm 4}") is None  # hesitation
    assert settled(["7", "7", "7"], 3) == "7"
    assert settled(["8", "7", "7"], 3) is None and settled(["7", "7"], 3) is None
    assert settled(["7", None, "7"], 2) is None
    assert settled(["7", " 7 "], 2) is not None  # answers compare as answer keys


def setup(directory, chains: int, probe_script):
    llm = LLM(str(directory), dtype="float32", device="cpu", block_size=4, num_kv_blocks=512)
    tok = llm.tokenizer
    sampler = ScriptedLogitsSampler(llm.engine.sampler, llm.engine.model_config.vocab_size)
    llm.engine.sampler = sampler
    filler = tok.convert_tokens_to_ids("x")
    sampler.script(SEED, range(chains), lambda position: (filler, 30))
    for index in range(chains, chains + 200):
        sampler.script(SEED, [index], probe_script(tok, index))
    forks: list[int] = []
    fork = llm.engine.fork

    def counting_fork(seq, n):
        if seq.num_output_tokens > 0:  # not the prefill's fork into the k chains
            forks.append(n)
        return fork(seq, n)

    llm.engine.fork = counting_fork
    return llm, forks


def answering(text: str):
    def make(tok, index):
        ids = [tok.convert_tokens_to_ids(c) for c in text]
        return lambda position: (ids[min(position, len(ids) - 1)], 30)
    return make


def solve(llm, strategy: str):
    engine = AsyncEngine(llm.engine).start()
    try:
        params = SamplingParams(temperature=1.0, seed=SEED, max_tokens=MAX_TOKENS)
        return asyncio.run(run_strategy(LocalBackend(engine), parse_strategy(strategy), PROMPT, params,
                                        extract="boxed"))
    finally:
        engine.shutdown()


def test_probe_stops_the_chain_once_its_answers_agree(tiny_llama):
    directory, _ = tiny_llama
    llm, forks = setup(directory, 1, answering("7}zz"))
    bm = llm.engine.block_manager
    answer = solve(llm, "probe:8(probe_agree=2, probe_tokens=4)")
    sample = answer.samples[0]
    assert answer.answer == "7" and sample.finish_reason == "stop" and "agreed" in sample.abort_reason
    assert sample.text.endswith("</think>" + DEFAULT_CUE + "7}zz")
    assert sample.num_tokens < 40  # stopped after two probes (~16 tokens), not at max_tokens
    cost = answer.cost
    cue = len(llm.tokenizer.encode("</think>" + DEFAULT_CUE, add_special_tokens=False))
    # Every probe was an engine fork of one sequence, counted in the cost with its tokens.
    assert cost.probes == len(forks) >= 2 and set(forks) == {1}
    assert cost.probe_tokens == 4 * cost.probes  # each decoded its 4 tokens
    assert cost.forced_tokens == cue * cost.probes
    assert cost.decode_tokens == sample.num_tokens + cost.probe_tokens
    assert bm.num_free_blocks == bm.num_blocks  # probes' and chain's blocks all returned


def test_disagreeing_probes_let_the_chain_run(tiny_llama):
    directory, _ = tiny_llama

    def alternating(tok, index):
        return answering("7}z" if index % 2 else "8}z")(tok, index)

    llm, forks = setup(directory, 1, alternating)
    answer = solve(llm, "probe:16(probe_agree=2, probe_tokens=3)")
    sample = answer.samples[0]
    assert sample.finish_reason == "length" and sample.num_tokens == MAX_TOKENS
    assert answer.cost.probes == len(forks) >= 5  # probed all along, never certain
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_hesitating_probes_never_settle(tiny_llama):
    directory, _ = tiny_llama
    llm, _ = setup(directory, 1, answering("wait 7}"))
    answer = solve(llm, "probe:16(probe_agree=2, probe_tokens=8)")
    assert answer.samples[0].finish_reason == "length"


def test_probe_majority_votes_over_probed_chains(tiny_llama):
    directory, _ = tiny_llama
    llm, forks = setup(directory, 3, answering("7}zz"))
    answer = solve(llm, "probe-majority@3(probe_every=8, probe_agree=2, probe_tokens=4)")
    assert answer.answer == "7" and answer.votes == {"7": 3.0}
    assert all(s.finish_reason == "stop" and s.num_tokens < 40 for s in answer.samples)
    assert answer.cost.probes == len(forks) >= 6
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_probes_over_a_remote_backend_are_refused_by_name():
    backend = RemoteBackend("http://127.0.0.1:9/v1", model="m")
    for name in ("probe:32", "probe-majority@4"):
        with pytest.raises(InvalidParameterError, match="cannot run over a remote server") as error:
            asyncio.run(run_strategy(backend, parse_strategy(name), [{"role": "user", "content": "q"}],
                                     SamplingParams()))
        assert name.split(":")[0].split("@")[0] in error.value.message


@pytest.mark.parametrize("text, field", [
    ("probe:0", "probe_every"), ("probe:8(probe_agree=0)", "probe_agree"), ("probe:8(probe_agree=65)", "probe_agree"),
    ("probe-majority@4(probe_tokens=0)", "probe_tokens"), ("probe-majority@0", "k"),
    ("probe:8(probe_every=16)", "probe_every"), ("probe:8(probe_agree=2.5)", "probe_agree"),
])
def test_out_of_range_probe_parameters_name_the_field(text, field):
    with pytest.raises(InvalidParameterError) as error:
        parse_strategy(text)
    assert error.value.param == field
