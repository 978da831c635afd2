"""Thinking budgets for models that reason between `<think>` and `</think>` (s1 budget forcing).

The cap is enforced inside the engine, on the exact token: when a sample has thought
for `budget` tokens without closing its thinking, the engine forces the end-of-thinking
marker plus an answer prefix (e.g. "Final answer:") and the sample goes on to answer
within `answer_tokens`. A minimum is enforced by making the marker (and EOS)
unsampleable until `min_tokens` thinking tokens exist, which is s1's suppression of
the end-of-thinking token; the model keeps reasoning instead of being told "Wait".
k > 1 samples are combined by majority vote over their answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from thinkwise.engine.sampling_params import SamplingParams
from thinkwise.strategies.base import Answer, Backend, Stopwatch, sample_to_completion
from thinkwise.strategies.registry import Param, StrategyDef, register, samples_param
from thinkwise.strategies.voting import vote


async def thinking_budget(backend: Backend, prompt_ids: list[int], params: SamplingParams, budget: int,
                          extract: Callable[[str], str | None], *, min_tokens: int = 0, answer_tokens: int = 64,
                          end_marker: str = "</think>", answer_prefix: str = "\nFinal answer: ", k: int = 1) -> Answer:
    clock = Stopwatch()
    run_params = replace(
        params, n=k, thinking_budget=budget, min_thinking_tokens=min_tokens, thinking_end=end_marker,
        answer_prefix=answer_prefix, max_tokens=budget + answer_tokens + 16,
    )
    samples, cost = await sample_to_completion(backend, prompt_ids, run_params, extract)
    chosen, votes = vote(samples)
    cost.wall_time_s = clock.seconds()
    return Answer(strategy=f"budget:{budget}", answer=chosen.answer if chosen else None,
                  text=chosen.text if chosen else (samples[0].text if samples else ""),
                  votes=votes, samples=samples, cost=cost)


def _check_budget(values: dict) -> None:
    if values["min_thinking_tokens"] > values["budget"]:
        from thinkwise.errors import InvalidParameterError

        raise InvalidParameterError(f"min_thinking_tokens ({values['min_thinking_tokens']}) must not exceed the "
                                    f"budget ({values['budget']})", param="min_thinking_tokens")


register(StrategyDef(
    kind="budget", pattern=r"budget(?::(?P<budget>\w+))?", usage="budget:TOKENS",
    help="think at most TOKENS tokens, then the end-of-thinking marker is forced (k samples voted, default 1)",
    params=(Param("budget", int, None, "thinking tokens", low=1, high=10_000_000),
            samples_param(default=1, help="samples voted (default 1)"),
            Param("min_thinking_tokens", int, 0, "the marker cannot come before this many thinking tokens", low=0,
                  high=10_000_000)),
    check=_check_budget,
    runner=lambda run: thinking_budget(run.backend, run.prompt, run.params, run.spec.budget, run.extract,
                                       min_tokens=run.spec.min_thinking_tokens, k=run.spec.k),
    suggestions=("budget:{first}",),
))
