"""Sequence continuation: the next term of a generated pattern.

Four pattern kinds rotate with the seed: arithmetic, geometric, Fibonacci-like (each
term the sum of the two before, from random seeds) and prime-based (primes times a
constant plus an offset). The level sets how large the numbers get (start values, ratios
and positions further out) and, for levels above 5, shows fewer terms.
"""

from __future__ import annotations

from thinkwise.tasks.base import ANSWER_FORMAT, NumericFamily, register

KINDS = ("arithmetic", "geometric", "fibonacci", "prime")


def _primes(count: int, skip: int) -> list[int]:
    primes: list[int] = []
    candidate = 2
    while len(primes) < count + skip:
        if all(candidate % p for p in primes if p * p <= candidate):
            primes.append(candidate)
        candidate += 1
    return primes[skip:]


@register
class SequenceFamily(NumericFamily):
    name, description = "sequence", "next term of an arithmetic/geometric/Fibonacci-like/prime pattern"
    min_level, max_level, default_levels = 1, 8, (1, 3, 5)

    def answer_tokens(self, level):
        return 32

    def reasoning_tokens(self, level):
        return 192 + 16 * level

    def make(self, level, rng):
        kind = KINDS[rng.randrange(len(KINDS))]
        shown = 6 if level <= 5 else 5
        scale = 10**level
        if kind == "arithmetic":
            start, step = rng.randint(-scale, scale), rng.choice([-1, 1]) * rng.randint(2, 3 * scale)
            terms = [start + i * step for i in range(shown + 1)]
        elif kind == "geometric":
            start, ratio = rng.randint(1, 9 * level), rng.randint(2, 2 + level)
            terms = [start * ratio**i for i in range(shown + 1)]
        elif kind == "fibonacci":
            a, b = rng.randint(1, scale), rng.randint(1, scale)
            terms = [a, b]
            while len(terms) < shown + 1:
                terms.append(terms[-1] + terms[-2])
        else:
            factor, offset = rng.randint(1, level + 1), rng.randint(-5 * level, 5 * level)
            terms = [factor * p + offset for p in _primes(shown + 1, rng.randint(0, 3 * level))]
        prompt = (f"What is the next number in this sequence: {', '.join(map(str, terms[:-1]))}, ...? "
                  f"{ANSWER_FORMAT}")
        return prompt, str(terms[-1]), {"kind": kind, "terms": terms[:-1]}
