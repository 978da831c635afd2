"""One builder of a step's host inputs, used by the eager runner and the CUDA-graph decoder:
slots, positions and lengths follow the block tables; the graph's padded image carries the
same values in its first rows."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from thinkwise.engine.cuda_graphs import CudaGraphDecoder
from thinkwise.engine.step_inputs import StepInputs, build_step_inputs


def seq(tokens, computed, table):
    return SimpleNamespace(token_ids=list(tokens), num_computed_tokens=computed, block_table=list(table))


SEQUENCES = [seq(range(100, 107), 6, [7, 3]), seq(range(200, 210), 9, [1, 4, 9]), seq(range(300, 305), 0, [5, 2])]


def test_slots_positions_lengths_follow_the_block_tables():
    inputs = build_step_inputs(SEQUENCES, [1, 1, 5], block_size=4)
    assert inputs.input_ids == [106, 209, 300, 301, 302, 303, 304]
    assert inputs.positions == [6, 9, 0, 1, 2, 3, 4]
    # position p of a sequence lives in slot table[p // 4] * 4 + p % 4
    assert inputs.slots == [3 * 4 + 2, 9 * 4 + 1, 20, 21, 22, 23, 2 * 4 + 0]
    assert inputs.seq_lens == [7, 10, 5]
    assert inputs.query_start_loc == [0, 1, 2, 7]
    assert inputs.block_tables == [[7, 3], [1, 4, 9], [5, 2]]
    assert inputs.num_decodes == 2


def test_device_fed_steps_leave_the_ids_to_the_device():
    inputs = build_step_inputs(SEQUENCES[:2], [1, 1], block_size=4, with_ids=False)
    assert inputs.input_ids == [0, 0] and inputs.positions == [6, 9]


def test_the_graph_image_is_the_same_inputs_padded_with_the_scratch_block():
    decoder = CudaGraphDecoder(None, [], block_size=4, scratch_block=99, max_blocks_per_seq=8,
                               device=torch.device("cpu"))
    inputs = build_step_inputs(SEQUENCES[:2], [1, 1], block_size=4)
    batch, width = 4, 8
    image = decoder._pad_inputs(batch, width, inputs, rows=[1, 0]).tolist()
    ids, positions, slots, lens, rows = (image[i * batch:(i + 1) * batch] for i in range(5))
    tables = [image[5 * batch + r * width: 5 * batch + (r + 1) * width] for r in range(batch)]
    assert ids == [106, 209, 0, 0] and positions == [6, 9, 0, 0]
    assert slots == inputs.slots + [99 * 4] * 2 and lens == [7, 10, 1, 1] and rows == [1, 0, 0, 0]
    assert tables[0] == [7, 3] + [99] * 6 and tables[1] == [1, 4, 9] + [99] * 5 and tables[3] == [99] * 8
    # The image a graph is captured with: every row padding.
    empty = decoder._pad_inputs(batch, width, StepInputs(), []).tolist()
    assert empty[2 * batch:3 * batch] == [99 * 4] * batch
