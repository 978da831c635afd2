"""Presence, frequency and repetition penalties on the device, without a host sync.

vLLM's semantics: with c[t] the count of token t among a sequence's generated tokens and
P the set of its prompt tokens,
    logit[t] = logit[t] / r  if logit[t] > 0 else logit[t] * r     for t in P or c[t] > 0
    logit[t] -= frequency * c[t] + presence * (c[t] > 0)
applied to the raw logits before temperature and the filters.

The counts live on the device: one row of a [slots, vocab] count table (and of a prompt
mask) per sequence, updated from the sampled ids *on the device* right after each draw,
so a step launched behind another (async scheduling, whose tokens the host has not seen)
still sees its predecessor's token. The host only knows which output positions a draw
covered; when it later learns the true token of a position (read back, redrawn on the
host, forced by a caller, or dropped because the sequence changed) it corrects the table
with device-side index updates: minus the drawn id (still a device tensor) plus the host
token — the same token in the common case, so the two cancel. Nothing here reads a
device value on the host. A sequence's slot is released once it finishes or is gone.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from thinkwise.engine.config import stage_to_device


@dataclass
class PenaltyRow:
    """A sampling row's penalties and the host's view of its sequence's tokens."""

    key: Any  # the sequence: its table slot is released once it is finished or collected
    seq_id: int
    presence: float
    frequency: float
    repetition: float
    token_ids: list[int]  # the sequence's prompt + output ids known on the host (the live list, not a copy)
    num_prompt_tokens: int
    position: int  # output position of the token being drawn (host outputs + tokens still on the device)


@dataclass
class _SlotState:
    slot: int
    owner: Any  # weak reference to the sequence
    counted: int = 0  # output positions [0, counted) are in the table with their host tokens
    drawn: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> drawn id (device), host not told yet


class PenaltyTracker:
    def __init__(self, device: torch.device):
        self.device = device
        self.counts: torch.Tensor | None = None  # [slots, vocab] int32, generated-token counts
        self.prompt_mask: torch.Tensor | None = None  # [slots, vocab] bool
        self.states: dict[int, _SlotState] = {}
        self.free: list[int] = []

    @staticmethod
    def rows_with_penalties(rows) -> list[int]:
        return [i for i, row in enumerate(rows) if row.penalty is not None]

    # ------------------------------------------------------------------ slots
    def _release_finished(self) -> None:
        for seq_id, state in list(self.states.items()):
            owner = state.owner()
            if owner is None or getattr(owner, "is_finished", False):
                self.free.append(state.slot)
                del self.states[seq_id]

    def _ensure_table(self, vocab: int) -> None:
        if self.counts is None or self.counts.shape[1] != vocab:
            self.counts = torch.zeros(8, vocab, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(8, vocab, dtype=torch.bool, device=self.device)
            self.states.clear()
            self.free = list(range(8))

    def _new_slot(self) -> int:
        if not self.free:
            size = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.prompt_mask = torch.cat([self.prompt_mask, torch.zeros_like(self.prompt_mask)])
            self.free = list(range(size, 2 * size))
        return self.free.pop()

    def _state(self, row: PenaltyRow) -> _SlotState:
        state = self.states.get(row.seq_id)
        if state is None:
            slot = self._new_slot()
            self.counts[slot].zero_()
            self.prompt_mask[slot].zero_()
            prompt = row.token_ids[:row.num_prompt_tokens]
            if prompt:
                self.prompt_mask[slot].index_fill_(0, stage_to_device(list(prompt), torch.long, self.device), True)
            try:
                owner = weakref.ref(row.key)
            except TypeError:  # not weak-referenceable (tests pass plain keys): kept until finished
                owner = (lambda key: (lambda: key))(row.key)
            state = self.states[row.seq_id] = _SlotState(slot, owner)
        return state

    # ------------------------------------------------------------------ per draw
    def apply(self, logits: torch.Tensor, rows) -> torch.Tensor:
        """`logits` (float, [rows, vocab]) with every penalized row's penalties applied (a new tensor)."""
        index = self.rows_with_penalties(rows)
        if not index:
            return logits
        self._ensure_table(logits.shape[-1])
        self._release_finished()
        add_slots: list[int] = []
        add_ids: list[int] = []
        undo_slots: list[int] = []
        undo_ids: list[torch.Tensor] = []
        readd_slots: list[int] = []
        readd_ids: list[torch.Tensor] = []  # drawn ids (device) counted again after a rebuild
        slots = []
        for i in index:
            row = rows[i].penalty
            state = self._state(row)
            slots.append(state.slot)
            known = len(row.token_ids) - row.num_prompt_tokens  # output positions the host knows
            # Draws the host knows now (their host token is added below) or that were superseded
            # (redrawn, or the sequence changed before they landed) come out of the table.
            done = [p for p in state.drawn if p < known or p >= row.position]
            if state.counted > known:  # the host has fewer tokens than counted (never expected): rebuild
                self.counts[state.slot].zero_()
                for p in done:
                    state.drawn.pop(p)
                readd_slots += [state.slot] * len(state.drawn)  # draws still in flight stay counted
                readd_ids += list(state.drawn.values())
                state.counted = 0
            else:
                undo_slots += [state.slot] * len(done)
                undo_ids += [state.drawn.pop(p) for p in done]
            start = row.num_prompt_tokens + state.counted
            new = row.token_ids[start:row.num_prompt_tokens + known]
            add_slots += [state.slot] * len(new)
            add_ids += new
            state.counted = known
        counts = self.counts
        if add_ids or readd_ids:
            ids = stage_to_device(add_ids, torch.long, self.device)
            if readd_ids:
                ids = torch.cat([ids, torch.stack(readd_ids).long()])
            where = (stage_to_device(add_slots + readd_slots, torch.long, self.device), ids)
            counts.index_put_(where, torch.ones(ids.shape[0], dtype=counts.dtype, device=self.device), accumulate=True)
        if undo_ids:
            where = (stage_to_device(undo_slots, torch.long, self.device), torch.stack(undo_ids).long())
            counts.index_put_(where, torch.full((len(undo_ids),), -1, dtype=counts.dtype, device=self.device),
                              accumulate=True)
        slot_index = stage_to_device(slots, torch.long, self.device)
        row_index = stage_to_device(index, torch.long, self.device)
        penalized = [rows[i].penalty for i in index]
        values = stage_to_device([[p.repetition, p.frequency, p.presence] for p in penalized], logits.dtype,
                                 self.device)
        repetition, frequency, presence = values[:, 0:1], values[:, 1:2], values[:, 2:3]
        row_counts = counts.index_select(0, slot_index)
        generated = row_counts > 0
        seen = generated | self.prompt_mask.index_select(0, slot_index)
        sub = logits.index_select(0, row_index)
        factor = torch.where(seen, repetition, torch.ones_like(repetition))
        sub = torch.where(sub > 0, sub / factor, sub * factor)
        sub = sub - frequency * row_counts.to(sub.dtype) - presence * generated.to(sub.dtype)
        return logits.index_copy(0, row_index, sub)

    def record(self, rows, tokens: torch.Tensor) -> None:
        """Count each penalized row's drawn token (still on the device) at its position."""
        index = self.rows_with_penalties(rows)
        if not index:
            return
        slots = []
        for i in index:
            row = rows[i].penalty
            state = self.states[row.seq_id]
            stale = state.drawn.pop(row.position, None)
            if stale is not None:  # drawn twice at one position without `apply` between: keep the last
                self.counts.index_put_((stage_to_device([state.slot], torch.long, self.device), stale.view(1).long()),
                                       torch.full((1,), -1, dtype=self.counts.dtype, device=self.device),
                                       accumulate=True)
            state.drawn[row.position] = tokens[i]
            slots.append(state.slot)
        drawn = tokens.index_select(0, stage_to_device(index, torch.long, self.device)).long()
        self.counts.index_put_((stage_to_device(slots, torch.long, self.device), drawn),
                               torch.ones(len(index), dtype=self.counts.dtype, device=self.device), accumulate=True)
