"""Turning logits into tokens: greedy, temperature, top-k, top-p, min-p, seeded.

Filters are applied batched over all rows. The draw is inverse-CDF sampling with one
uniform number per row, and that number is a hash of the sample's seed and its output
position alone, so a seeded sample draws the same tokens whatever else shares its
batch, whichever step it lands in, and after preemption and recomputation (given the
same logits). One number per row also keeps sampling cheap next to a 150k-token
vocabulary; top-p looks at the top 1,024 tokens first and sorts the whole vocabulary
only for rows whose nucleus is larger. Presence, frequency and repetition penalties
(engine/penalties.py) change the logits first, from token counts kept on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thinkwise.engine.config import stage_to_device
from thinkwise.engine.penalties import PenaltyRow, PenaltyTracker

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, salt: int) -> int:
    """splitmix64 of (seed, salt): decorrelated 63-bit seeds for sample i / step t."""
    x = (seed * 0x9E3779B97F4A7C15 + (salt + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def uniform_from_seed(seed: int, position: int) -> float:
    """A uniform number in (0, 1), a pure function of (seed, position)."""
    return ((mix_seed(seed, position) >> 10) + 0.5) / float(1 << 53)


_TOP_P_CANDIDATES = 1024


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary, per row. On the CPU NumPy's: PyTorch's argmax reduction is
    scalar there (~160 us for one fp32 row of a 152k vocabulary on an AVX2 EPYC, against ~13
    us: ~0.6% of the default model's batch-1 decode step). Used where every row is greedy (a
    mixed batch takes torch's, on the device, like the rest of its draw). Same answer: the first
    maximum, NaN counting as the largest value, as in `torch.argmax`."""
    if logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and logits.is_contiguous():
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


@dataclass
class SamplingRow:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    position: int  # index of the token being sampled among the sample's outputs
    logprobs: int | None
    banned_token_ids: tuple[int, ...] = ()  # e.g. EOS before min_tokens
    penalty: PenaltyRow | None = None  # presence/frequency/repetition penalties, None: none
    confidence_k: int = 0  # DeepConf: > 0 also gives -mean of the top-k logprobs (`Sampler.confidence`)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # log p of each sampled token under the model's distribution
    top_logprobs: list[list[tuple[int, float]]] | None
    confidence: list[float] | None = None  # per row, where its SamplingRow.confidence_k > 0 (else nan)


def _nucleus(sorted_probs: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Which of the descending `sorted_probs` top-p keeps: a token stays while the mass of
    the tokens strictly more likely than it is below `wanted` (so the first always stays).
    Tied tokens are kept or dropped together: topk/sort leave ties in an unspecified order,
    and a cut through a tie would make the kept set, and so the draw, depend on that order."""
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    descending = (-sorted_probs).contiguous()  # ascending, for searchsorted
    first_of_value = torch.searchsorted(descending, descending)  # first index holding each value
    return mass_before.gather(1, first_of_value) < wanted


class Sampler:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.penalties = PenaltyTracker(self.device)

    @staticmethod
    def device_ready(row: SamplingRow) -> bool:
        """Whether `draw` picks this row's token without the host waiting for the device: no
        logprobs to copy back and no banned ids (a top-p nucleus wider than the top-1,024
        candidates is flagged by `draw` and redone on the host, which is rare)."""
        return row.logprobs is None and not row.banned_token_ids

    @staticmethod
    @torch.inference_mode()
    def confidence(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor | None:
        """DeepConf's token confidence, left on the device: -mean of the top-k log-probabilities
        of the model's distribution (before temperature and filters), k = the row's
        `confidence_k`; nan for rows that asked for none; None when no row asked."""
        ks = [r.confidence_k for r in rows]
        if not any(ks):
            return None
        k_max = min(max(ks), logits.shape[-1])
        values = logits.float()
        if min(ks) == k_max:  # every row asked for the same k (one strategy's samples): no per-row tensors to stage
            return torch.logsumexp(values, dim=-1) - values.topk(k_max, dim=-1).values.mean(dim=-1)
        # log p = logit - logsumexp: the top-k of the raw logits and one reduction, without
        # writing a whole log-softmax matrix.
        top = values.topk(k_max, dim=-1).values.cumsum(dim=-1)
        k_index = stage_to_device([max(min(k, k_max), 1) - 1 for k in ks], torch.long, logits.device)
        mean = top.gather(1, k_index[:, None]).squeeze(1) / (k_index + 1) - torch.logsumexp(values, dim=-1)
        wanted = stage_to_device([k > 0 for k in ks], torch.bool, logits.device)
        return torch.where(wanted, -mean, torch.full_like(mean, float("nan")))

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        confidence = self.confidence(logits, rows)  # of the raw logits, before the bans below
        logits = logits.float()
        if any(row.banned_token_ids for row in rows):
            logits = logits.clone()  # .float() of fp32 logits is the caller's tensor: never write into it
            for i, row in enumerate(rows):
                if row.banned_token_ids:
                    logits[i, list(row.banned_token_ids)] = float("-inf")
        want_logprobs = any(r.logprobs is not None for r in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        tokens, _ = self.draw(logits, rows, exact=True)
        token_list = tokens.tolist()
        confidence_list = confidence.tolist() if confidence is not None else None  # the device is synced already
        if not want_logprobs:
            return SampleResult(token_list, None, None, confidence_list)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        max_k = max((r.logprobs or 0) for r in rows)
        top: list[list[tuple[int, float]]] = [[] for _ in rows]
        if max_k:
            values, ids = raw_logprobs.topk(max_k, dim=-1)
            values, ids = values.tolist(), ids.tolist()
            for i, row in enumerate(rows):
                k = row.logprobs or 0
                top[i] = list(zip(ids[i][:k], values[i][:k]))
        return SampleResult(token_list, chosen, top, confidence_list)

    @torch.inference_mode()
    def draw(self, logits: torch.Tensor, rows: list[SamplingRow],
             exact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampled token ids, left on the device (banned ids must already be masked),
        and None or a device flag per row: True where the token is not the exact draw (a
        top-p nucleus wider than the candidates; never with `exact`, which may sync)."""
        logits = self.penalties.apply(logits.float(), rows)
        tokens, redo = self._draw(logits, rows, exact)
        self.penalties.record(rows, tokens)
        return tokens, redo

    def _draw(self, logits: torch.Tensor, rows: list[SamplingRow],
              exact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        greedy = [r.temperature == 0 for r in rows]
        if all(greedy):
            return greedy_tokens(logits), None  # the common benchmark/greedy case: one kernel
        if not any(greedy):  # every row samples (the usual batch): no gather and no scatter
            return self._inverse_cdf(logits, rows, exact)
        device = logits.device
        tokens = torch.empty(len(rows), dtype=torch.long, device=device)
        idx = stage_to_device([i for i, g in enumerate(greedy) if g], torch.long, device)
        tokens[idx] = logits[idx].argmax(dim=-1)
        idx_list = [i for i, g in enumerate(greedy) if not g]
        idx = stage_to_device(idx_list, torch.long, device)
        drawn, sub_redo = self._inverse_cdf(logits[idx], [rows[i] for i in idx_list], exact)
        tokens[idx] = drawn
        if sub_redo is None:
            return tokens, None
        redo = torch.zeros(len(rows), dtype=torch.bool, device=device)
        redo[idx] = sub_redo
        return tokens, redo

    def _inverse_cdf(self, logits: torch.Tensor, rows: list[SamplingRow],
                     exact: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's draw from its filtered distribution, and the redo flags of `_filtered_probs`."""
        probs, redo = self._filtered_probs(logits, rows, exact=exact)
        cdf = probs.double().cumsum(dim=-1)
        uniforms = stage_to_device([uniform_from_seed(r.seed, r.position) for r in rows], torch.float64,
                                   logits.device)
        # The first index whose cumulative mass reaches u * total: a token with p > 0
        # because u > 0 and the mass strictly before it is below the target.
        target = (uniforms * cdf[:, -1]).unsqueeze(1)
        drawn = torch.searchsorted(cdf, target).squeeze(1)
        return drawn.clamp_max_(probs.shape[-1] - 1), redo

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, rows: list[SamplingRow],
                        exact: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Filtered probabilities, and (when not `exact`) which rows' top-p nucleus is wider
        than the candidates: those rows' probabilities are then wrong and must be redone
        exactly. `exact` finds out on the host instead (a sync) and sorts everything."""
        device = logits.device
        temps = stage_to_device([r.temperature for r in rows], logits.dtype, device)
        logits = logits / temps[:, None]
        vocab = logits.shape[-1]
        redo = None
        top_ks = [r.top_k if r.top_k > 0 else vocab for r in rows]
        if any(k < vocab for k in top_ks):
            k_max = max(k for k in top_ks if k < vocab)
            kth = logits.topk(k_max, dim=-1).values
            k_index = stage_to_device([min(k, k_max) - 1 for k in top_ks], torch.long, device)
            threshold = kth.gather(1, k_index[:, None])
            no_limit = stage_to_device([k >= vocab for k in top_ks], torch.bool, device)
            threshold = torch.where(no_limit[:, None], torch.full_like(threshold, float("-inf")), threshold)
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if any(r.min_p > 0 for r in rows):
            min_p = stage_to_device([r.min_p for r in rows], probs.dtype, device)
            cutoff = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
            probs = probs.masked_fill(probs < cutoff, 0.0)
        if any(r.top_p < 1 for r in rows):
            top_p = stage_to_device([r.top_p for r in rows], probs.dtype, device)
            wanted = top_p[:, None] * probs.sum(dim=-1, keepdim=True)
            candidates = min(_TOP_P_CANDIDATES, probs.shape[-1])
            sorted_probs, order = probs.topk(candidates, dim=-1)
            keep_sorted = _nucleus(sorted_probs, wanted)
            if candidates < probs.shape[-1]:
                # The nucleus may reach past the candidates when their last one is kept (rows
                # without a limit keep everything anyway).
                wide = keep_sorted[:, -1] & (top_p < 1)
                if not exact:
                    redo = wide
                elif bool(wide.any()):
                    sorted_probs, order = probs.sort(dim=-1, descending=True)  # a wide nucleus: sort it all
                    keep_sorted = _nucleus(sorted_probs, wanted)
            keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, keep_sorted)
            keep |= (top_p >= 1)[:, None]
            probs = probs.masked_fill(~keep, 0.0)
        return probs, redo
