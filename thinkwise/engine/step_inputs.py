"""The host lists a step feeds the model: token ids, positions, cache slots, context lengths
and block tables of each scheduled sequence's pending tokens.

One builder for every path: the eager runner (`ModelRunner.prepare`), the CUDA-graph
decoder (which pads the same lists to a captured shape) and device-fed steps (whose
token ids come from the device instead); so a slot or a length is computed one way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ScheduledTokens(Protocol):
    """What the builder reads of a sequence (a `Sequence`, or a calibration prompt)."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]


@dataclass
class StepInputs:
    input_ids: list[int] = field(default_factory=list)  # zeros where the ids come from the device
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # cache slot of each new token
    seq_lens: list[int] = field(default_factory=list)  # context length of each sequence after the step
    block_tables: list[list[int]] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])  # offsets of each sequence's tokens

    @property
    def num_decodes(self) -> int:
        """Leading sequences that compute a single token."""
        starts = self.query_start_loc
        count = 0
        while count + 1 < len(starts) and starts[count + 1] - starts[count] == 1:
            count += 1
        return count


def build_step_inputs(sequences: list[ScheduledTokens], num_new_tokens: list[int], block_size: int,
                      with_ids: bool = True) -> StepInputs:
    """Inputs for computing the next `num_new_tokens[i]` pending tokens of each sequence, in
    the order given. `with_ids=False` leaves the ids as zeros (a device-fed step)."""
    inputs = StepInputs()
    for seq, n in zip(sequences, num_new_tokens):
        begin = seq.num_computed_tokens
        end = begin + n
        inputs.input_ids.extend(seq.token_ids[begin:end] if with_ids else [0] * n)
        inputs.positions.extend(range(begin, end))
        table = seq.block_table
        inputs.slots.extend(table[p // block_size] * block_size + p % block_size for p in range(begin, end))
        inputs.query_start_loc.append(inputs.query_start_loc[-1] + n)
        inputs.seq_lens.append(end)
        inputs.block_tables.append(table)
    return inputs
