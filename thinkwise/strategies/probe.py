"""Answer probing (Dynasor-CoT's certaindex): stop a thinking chain once its answer has settled.

Every P tokens of a chain's thinking, a probe is forked off it: a copy-on-write sequence
that shares every KV block of the chain, is forced the end-of-thinking marker plus an
answer cue ("</think>\\n\\nThe final answer is \\boxed{") and decodes at most a few
tokens, then ends and frees its own blocks (the chain's stay). A probe's answer is what
it wrote before the closing brace; none when it wrote no brace or hesitated ("wait",
"hmm"). When the last w probe answers of a chain are non-empty and agree, the chain is
certain: it is stopped (its blocks freed) and its answer is the probes'. Its text in the
Answer is the chain so far plus the cue and the probe's answer, which is what the model
would have answered had it been stopped there. A chain that closes its thinking on its
own is no longer probed. `probe:P` runs one chain; `probe-majority@k` runs k chains,
each probed, and votes over their answers as majority@k does. Probe tokens are counted
in the cost (`probes`, `probe_tokens`). Probes need this process's engine (a fork is an
engine primitive), so a remote backend is refused with an error naming the strategy.
"""

from __future__ import annotations

from dataclasses import replace

from thinkwise.errors import InvalidParameterError
from thinkwise.strategies.base import Answer, LocalSampleGroup, SampleOutcome, StrategyCost, Stopwatch, outcomes
from thinkwise.strategies.registry import Param, StrategyDef, StrategyRun, register, samples_param
from thinkwise.strategies.voting import vote
from thinkwise.tasks.extraction import answer_key

DEFAULT_CUE = "\n\nThe final answer is \\boxed{"
HESITATIONS = ("wait", "hmm", "alternatively")


def probe_answer(text: str) -> str | None:
    """The answer a probe wrote after the cue: up to the brace closing the cue's `{`."""
    depth = 0
    for position, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                answer = text[:position].strip()
                lowered = answer.lower()
                if not answer or any(word in lowered for word in HESITATIONS):
                    return None
                return answer
            depth -= 1
    return None


def settled(history: list[str | None], agree: int) -> str | None:
    """The agreed answer when the last `agree` probe answers are all present and equal."""
    if len(history) < agree:
        return None
    last = history[-agree:]
    if any(a is None for a in last) or len({answer_key(a) for a in last}) != 1:
        return None
    return last[-1]


async def probed_chains(run: StrategyRun, k: int, name: str) -> tuple[list[SampleOutcome], StrategyCost]:
    spec, backend, params = run.spec, run.backend, run.params
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        raise InvalidParameterError(f"{name} needs a tokenizer to force the answer cue into its probes",
                                    param="strategy")
    cue = params.thinking_end + (params.answer_prefix or DEFAULT_CUE)
    cue_ids = list(tokenizer.encode(cue, add_special_tokens=False))
    group = await backend.start(run.prompt, replace(params, n=k))
    if not isinstance(group, LocalSampleGroup):
        raise InvalidParameterError(f"{name} forks probes inside this process's engine; this backend cannot",
                                    param="strategy")
    next_at = [spec.probe_every] * k
    in_flight: dict[int, int] = {}  # probe index -> chain index
    history: list[list[str | None]] = [[] for _ in range(k)]
    decided: dict[int, tuple[str, str]] = {}  # chain -> (answer, probe text)
    try:
        while not group.done:
            await group.next_events()
            while group.probes_finished:
                probe_index = group.probes_finished.pop(0)
                chain = in_flight.pop(probe_index, None)
                if chain is None:
                    continue
                text = group.probe_texts.get(probe_index, "")
                history[chain].append(probe_answer(text))
                agreed = settled(history[chain], spec.probe_agree)
                if agreed is not None and chain not in decided and group.finish_reasons[chain] is None:
                    decided[chain] = (agreed, text)
                    await group.abort_sample(chain, f"probe: the last {spec.probe_agree} probe answers agreed")
            for chain in range(k):
                if (group.finish_reasons[chain] is not None or chain in decided or chain in in_flight.values()
                        or group.num_tokens[chain] < next_at[chain] or params.thinking_end in group.texts[chain]):
                    continue
                next_at[chain] = group.num_tokens[chain] + spec.probe_every
                probe_index = await group.probe(chain, cue_ids, spec.probe_tokens)
                if probe_index is not None:
                    in_flight[probe_index] = chain
    except BaseException:
        if not group.done:
            await group.abort_rest("the strategy failed")
        raise
    cost = StrategyCost(samples=k, probes=group.probes, probe_tokens=group.probe_tokens)
    cost.add(group.final.counts, backend.intensity)
    samples = outcomes(group, run.extract)
    for chain, (agreed, probe_text) in decided.items():
        sample = samples[chain]
        sample.text = group.texts[chain] + cue + probe_text
        sample.answer = run.extract(sample.text) or agreed
        sample.finish_reason = "stop"  # it answered: through its probe, the answer it had settled on
    cost.aborted_samples = sum(1 for s in samples if s.finish_reason == "abort")
    return samples, cost


async def probe_one(run: StrategyRun) -> Answer:
    clock = Stopwatch()
    name = f"probe:{run.spec.probe_every}"
    samples, cost = await probed_chains(run, 1, name)
    chosen, votes = vote(samples)
    cost.wall_time_s = clock.seconds()
    sample = samples[0]
    return Answer(strategy=name, answer=sample.answer if sample.finished else None, text=sample.text, votes=votes,
                  samples=samples, cost=cost)


async def probe_majority(run: StrategyRun) -> Answer:
    clock = Stopwatch()
    name = f"probe-majority@{run.spec.k}"
    samples, cost = await probed_chains(run, run.spec.k, name)
    chosen, votes = vote(samples)
    cost.wall_time_s = clock.seconds()
    return Answer(strategy=name, answer=chosen.answer if chosen else None, text=chosen.text if chosen else "",
                  votes=votes, samples=samples, cost=cost)


def _probe_params(every_default) -> tuple[Param, ...]:
    return (
        Param("probe_every", int, every_default, "probe every P thinking tokens (P)", low=1, high=1_000_000),
        Param("probe_agree", int, 3, "stop once the last w probe answers agree (w)", low=1, high=64),
        Param("probe_tokens", int, 10, "tokens a probe may decode", low=1, high=256),
    )


_LOCAL = "it forks copy-on-write probes off the chains inside this process's engine"
register(StrategyDef(
    kind="probe", pattern=r"probe(?::(?P<probe_every>\w+))?", usage="probe:P",
    help="one chain, probed for its answer every P tokens; stops once w probes agree (Dynasor-CoT)",
    params=_probe_params(32), local_only=_LOCAL, runner=probe_one, suggestions=("probe:{first}",),
))
register(StrategyDef(
    kind="probe_majority", pattern=r"probe-majority@(?P<k>\w*)", usage="probe-majority@K",
    help="k chains, each probed and stopped once its answer settles, then a majority vote",
    params=(samples_param(),) + _probe_params(32), local_only=_LOCAL, runner=probe_majority,
    suggestions=("probe-majority@{last}", "probe-majority@k"),
))
