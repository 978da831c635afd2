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

Cost per step, which decides whether penalties keep up with plain sampling at batch 64 on a
150k vocabulary: the host does list and dict work per row and nothing else per row; a step's
small lists reach the device in one copy; the table takes one index_add_ of ±1 per `apply`
and one per `record` (a draw is remembered as the flat table indices it added, so taking it
back is that tensor, or one gather of it, never a view per row); and the logits are penalized by one
fused pass (kernels/triton_penalties.py) that reads each element once.
"""

from __future__ import annotations

import weakref
from array import array
from dataclasses import dataclass, field
from typing import Any

import torch


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
    # position -> (the flat table indices slot * vocab + id that a draw added, on the device;
    # this sequence's entry in them): a draw whose token the host has not been told yet
    drawn: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)


_ARRAY_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}


class _Staging:
    """A step's small host lists sent to the device in one copy: packed into one byte buffer,
    pinned, copied without blocking, and read there as typed views. One transfer instead of
    one `stage_to_device` per list keeps the host's step short. Each list starts on 16 bytes,
    so the kernel's pointers always have the alignment Triton specializes on (no recompile)."""

    def __init__(self) -> None:
        self.parts: list[tuple[array, torch.dtype]] = []

    def add(self, values, dtype: torch.dtype) -> int:
        self.parts.append((array(_ARRAY_CODES[dtype], values), dtype))
        return len(self.parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        blob = bytearray()
        spans = []
        for values, dtype in self.parts:
            spans.append((len(blob), len(values) * dtype.itemsize, dtype))
            blob += values.tobytes()
            blob += bytes(-len(blob) % 16)
        host = torch.frombuffer(blob or bytearray(16), dtype=torch.uint8)  # keeps `blob` alive
        staged = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        return [staged[start:start + size].view(dtype) for start, size, dtype in spans]


class _Corrections:
    """±1 updates of the count table as flat indices slot * vocab + id, sent as one index_add_:
    host tokens (+1, ids known here) and earlier draws (their flat indices still on the device),
    grouped by the draw and the sign, so each draw costs one slice however many rows it has."""

    def __init__(self) -> None:
        self.host: list[int] = []  # +1 each
        self.groups: dict[tuple[int, int], tuple[torch.Tensor, int, list[int]]] = {}

    def entries(self, flat: torch.Tensor, sign: int) -> list[int]:
        """The list of entries of the draw `flat` to count with `sign` (the caller appends)."""
        group = self.groups.get((id(flat), sign))
        if group is None:
            group = self.groups[id(flat), sign] = (flat, sign, [])
        return group[2]

    def __bool__(self) -> bool:
        return bool(self.host or self.groups)

    def stage(self, staging: _Staging) -> tuple:
        signs = [1] * len(self.host)
        parts: list = [staging.add(self.host, torch.int64)] if self.host else []
        for flat, sign, entries in self.groups.values():
            whole = len(entries) == flat.shape[0] and entries == list(range(len(entries)))  # no gather needed
            parts.append((flat, None if whole else staging.add(entries, torch.int64)))
            signs += [sign] * len(entries)
        return parts, staging.add(signs, torch.int32)

    @staticmethod
    def send(counts: torch.Tensor, staged: list[torch.Tensor], plan: tuple) -> None:
        """One index_add_ into the flat table (integer adds: their order does not matter)."""
        parts, values = plan
        flat = [staged[part] if isinstance(part, int)
                else part[0] if part[1] is None else part[0].index_select(0, staged[part[1]]) for part in parts]
        counts.view(-1).index_add_(0, flat[0] if len(flat) == 1 else torch.cat(flat), staged[values])


@dataclass
class _Step:
    """One `apply`'s host-side findings, per logits row and for the table."""

    row_slots: list[int]  # per logits row: its table slot, -1 without penalties
    params: list[float]  # per logits row: repetition, frequency, presence (neutral without penalties)
    states: list[_SlotState] = field(default_factory=list)  # per penalized row
    fresh: list[int] = field(default_factory=list)  # new slots: counts and prompt rows cleared
    cleared: list[int] = field(default_factory=list)  # slots rebuilt from the host's tokens: counts cleared
    prompt_flat: list[int] = field(default_factory=list)  # slot * vocab + prompt id, for the new slots
    corrections: _Corrections = field(default_factory=_Corrections)


@dataclass
class _RowPlan:
    """What `record` needs of the rows `apply` just penalized, staged by `apply` (a draw
    follows every apply with the same rows, so `record` then stages and looks up nothing)."""

    rows: Any  # the rows list `apply` saw (compared by identity)
    index: list[int]
    states: list[_SlotState]
    offsets: torch.Tensor  # [n] int64 on the device: slot * vocab per penalized row
    ones: torch.Tensor  # [n] int32 on the device
    gather: torch.Tensor | None  # [n] the penalized rows' indices, None when every row is one


class PenaltyTracker:
    def __init__(self, device: torch.device):
        self.device = device
        self.counts: torch.Tensor | None = None  # [slots, vocab] int32, generated-token counts
        self.prompt_mask: torch.Tensor | None = None  # [slots, vocab] bool
        self.states: dict[int, _SlotState] = {}
        self.free: list[int] = []
        self._plan: _RowPlan | None = None  # of the last `apply`, for the `record` that follows it
        # The last staged per-row lists and their device copies, reused while they repeat (staged
        # tensors are never written, so an earlier step's copy stays valid).
        self._row_lists: tuple[list, Any] = ([], None)
        self._params: tuple[list, Any] = ([], None)

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
            self._row_lists = ([], None)

    def _new_slot(self) -> int:
        if not self.free:
            size = self.counts.shape[0]
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.prompt_mask = torch.cat([self.prompt_mask, torch.zeros_like(self.prompt_mask)])
            self.free = list(range(size, 2 * size))
        return self.free.pop()

    def _new_state(self, row: PenaltyRow, fresh: list[int], prompt_flat: list[int]) -> _SlotState:
        """A slot for a sequence seen for the first time; its table rows are cleared and its
        prompt marked by the caller, batched with the step's other new slots (`fresh`, `prompt_flat`)."""
        slot = self._new_slot()
        fresh.append(slot)
        base = slot * self.counts.shape[1]
        prompt_flat += [base + t for t in set(row.token_ids[:row.num_prompt_tokens])]
        try:
            owner = weakref.ref(row.key)
        except TypeError:  # not weak-referenceable (tests pass plain keys): kept until finished
            owner = (lambda key: (lambda: key))(row.key)
        state = self.states[row.seq_id] = _SlotState(slot, owner)
        return state

    # ------------------------------------------------------------------ per draw
    def apply(self, logits: torch.Tensor, rows) -> torch.Tensor:
        """`logits` (float, [rows, vocab]) with every penalized row's penalties applied (a new
        tensor; `logits` itself is left as it was: its caller may read it again)."""
        index = self.rows_with_penalties(rows)
        self._plan = None
        if not index:
            return logits
        vocab = logits.shape[-1]
        self._ensure_table(vocab)
        self._release_finished()
        step = self._walk(rows, index, vocab)
        # Everything the device needs from the host this step, in one copy.
        staging = _Staging()
        staged_rows = self._row_lists[1] if step.row_slots == self._row_lists[0] else None
        if staged_rows is None:
            at_rows = (staging.add(step.row_slots, torch.int64),
                       staging.add([s * vocab for s in step.row_slots if s >= 0], torch.int64),
                       staging.add([1] * len(index), torch.int32),
                       None if len(index) == len(rows) else staging.add(index, torch.int64))
        staged_params = self._params[1] if step.params == self._params[0] else None
        if staged_params is None:
            at_params = staging.add(step.params, torch.float32)
        cleared = step.fresh + step.cleared
        at_cleared = staging.add(cleared, torch.int64) if cleared else None
        at_prompt = (staging.add(step.fresh, torch.int64), staging.add(step.prompt_flat, torch.int64)) \
            if step.fresh else None
        plan = step.corrections.stage(staging) if step.corrections else None
        staged = staging.send(self.device) if staging.parts else []  # nothing changed: no copy at all
        if staged_rows is None:
            staged_rows = tuple(None if at is None else staged[at] for at in at_rows)
            self._row_lists = (step.row_slots, staged_rows)
        if staged_params is None:
            staged_params = staged[at_params].view(-1, 3)
            self._params = (step.params, staged_params)
        # The table: clear new and rebuilt slots, mark new prompts, then the step's +-1 corrections.
        if at_cleared is not None:
            self.counts.index_fill_(0, staged[at_cleared], 0)
        if at_prompt is not None:
            self.prompt_mask.index_fill_(0, staged[at_prompt[0]], False)
            self.prompt_mask.view(-1).index_fill_(0, staged[at_prompt[1]], True)
        if plan is not None:
            step.corrections.send(self.counts, staged, plan)
        slots, offsets, ones, gather = staged_rows
        self._plan = _RowPlan(rows, index, step.states, offsets, ones, gather)
        return _penalize(logits, slots, staged_params, self.counts, self.prompt_mask)

    def _walk(self, rows, index: list[int], vocab: int) -> _Step:
        """What the host knows now that the table does not, row by row: only list and dict work
        per row (this loop is most of the host's time in `apply`)."""
        step = _Step([-1] * len(rows), [1.0, 0.0, 0.0] * len(rows))
        row_slots, params, corrections = step.row_slots, step.params, step.corrections
        host = corrections.host
        # Bound once: at batch 64 the lookups themselves are a tenth of this loop.
        find_state, keep_state, add_host = self.states.get, step.states.append, host.append
        undo_flat, undo = None, []
        for i in index:
            row = rows[i].penalty
            state = find_state(row.seq_id)
            if state is None:
                state = self._new_state(row, step.fresh, step.prompt_flat)
            keep_state(state)
            slot = row_slots[i] = state.slot
            params[3 * i] = row.repetition
            params[3 * i + 1] = row.frequency
            params[3 * i + 2] = row.presence
            num_prompt = row.num_prompt_tokens
            token_ids = row.token_ids
            known = len(token_ids) - num_prompt  # output positions the host knows
            drawn = state.drawn
            if state.counted > known:  # the host has fewer tokens than counted (never expected): rebuild
                step.cleared.append(slot)
                for p in [p for p in drawn if p < known or p >= row.position]:
                    del drawn[p]
                for flat, entry in drawn.values():  # draws still in flight stay counted
                    corrections.entries(flat, 1).append(entry)
                state.counted = 0
            elif drawn:
                # Draws the host knows now (their host token is added below) or that were superseded
                # (redrawn, or the sequence changed before they landed) come out of the table.
                position = row.position
                for p in [p for p in drawn if not known <= p < position]:
                    flat, entry = drawn.pop(p)
                    if flat is not undo_flat:  # rows of one draw usually follow each other
                        undo_flat, undo = flat, corrections.entries(flat, -1)
                    undo.append(entry)
            counted = state.counted
            if known > counted:
                if known == counted + 1:  # the common case: one token landed since the last draw
                    add_host(slot * vocab + token_ids[num_prompt + counted])
                else:
                    base = slot * vocab
                    host += [base + t for t in token_ids[num_prompt + counted:num_prompt + known]]
                state.counted = known
        return step

    def record(self, rows, tokens: torch.Tensor) -> None:
        """Count each penalized row's drawn token (still on the device) at its position."""
        plan, self._plan = self._plan, None
        if plan is None or plan.rows is not rows:  # not right after `apply` of these rows: stage afresh
            plan = self._plan_record(rows)
            if plan is None:
                return
        drawn_ids = tokens if plan.gather is None else tokens.index_select(0, plan.gather)
        flat = drawn_ids.long() + plan.offsets  # this draw's table indices, kept to take it back later
        stale = None
        for entry, (i, state) in enumerate(zip(plan.index, plan.states)):
            position = rows[i].penalty.position
            drawn = state.drawn
            if position in drawn:  # drawn twice at one position without `apply` between: keep the last
                if stale is None:
                    stale = _Corrections()
                old_flat, old_entry = drawn[position]
                stale.entries(old_flat, -1).append(old_entry)
            drawn[position] = (flat, entry)
        self.counts.view(-1).index_add_(0, flat, plan.ones)
        if stale is not None:
            staging = _Staging()
            stale_plan = stale.stage(staging)
            stale.send(self.counts, staging.send(self.device), stale_plan)

    def _plan_record(self, rows) -> _RowPlan | None:
        index = self.rows_with_penalties(rows)
        if not index:
            return None
        vocab = self.counts.shape[1]
        states = [self.states[rows[i].penalty.seq_id] for i in index]
        staging = _Staging()
        staging.add([state.slot * vocab for state in states], torch.int64)
        staging.add([1] * len(index), torch.int32)
        every = len(index) == len(rows)
        if not every:
            staging.add(index, torch.int64)
        staged = staging.send(self.device)
        return _RowPlan(rows, index, states, staged[0], staged[1], None if every else staged[2])


def _penalize(logits, slots, params, counts, prompt_mask) -> torch.Tensor:
    # Imported here: importing it defines a Triton kernel, which must follow TRITON_INTERPRET.
    from thinkwise.kernels.triton_penalties import penalize

    return penalize(logits, slots, params, counts, prompt_mask)
