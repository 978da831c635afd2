"""Programmatic dependent launch: where it is on, and (on a Hopper GPU) that chains of PDL
kernels compute exactly what plain launches compute, with inputs that change between
CUDA-graph replays so a read before `gdc_wait` would show."""

from __future__ import annotations

import pytest
import torch

from thinkwise.kernels import pdl
from thinkwise.kernels import triton_gemm as tg

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
hopper_only = pytest.mark.skipif(not HOPPER, reason="PDL needs a GPU of compute capability 9.0 or newer")


@pytest.fixture(autouse=True)
def pdl_defaults():
    """Each test starts from, and leaves, the default PDL settings (they are process-wide)."""
    pdl.configure()
    yield
    pdl.configure()


def test_off_on_cpu_and_when_disabled():
    assert not pdl.pdl_enabled(torch.device("cpu"))
    assert pdl.launch_options(torch.device("cpu")) == {}
    if HOPPER:
        assert pdl.launch_options(torch.device("cuda")) == {"launch_pdl": True}
        assert pdl.launch_options(torch.device("cuda"), rows=pdl.max_rows() + 1) == {}  # big steps: plain
        pdl.configure(enabled=False)
        assert not pdl.pdl_enabled(torch.device("cuda"))


def _chain_outputs(rows: int, replays: int, layers: int = 6) -> list[torch.Tensor]:
    """Each layer: residual add + RMSNorm -> flat GEMM -> SiLU-mul -> flat GEMM, over
    several layers, captured in a CUDA graph; each replay gets a fresh input."""
    from thinkwise.kernels.fused import add_rms_norm, silu_mul

    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter = 512, 1536
    dtype = torch.bfloat16

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device="cuda") * scale).to(dtype)

    up = [rand(2 * inter, hidden, scale=hidden**-0.5) for _ in range(layers)]
    down = [rand(hidden, inter, scale=inter**-0.5) for _ in range(layers)]
    norms = [1 + rand(hidden, scale=0.1) for _ in range(layers)]
    inputs = [rand(rows, hidden) for _ in range(replays)]
    configs = tg.DEFAULT_CONFIGS
    gemv = [c for c in configs if not c.use_dot][0] if rows <= 4 else configs[1]
    # The down projection splits K (split-K's counters and partials exercise the waits too).
    split = tg.FlatGemmConfig(block_n=64, block_k=128, split_k=4)
    workspace = tg.SplitKWorkspace("cuda", *tg.workspace_size(rows, hidden, inter, split, torch.device("cuda")))
    static_in = torch.empty(rows, hidden, dtype=dtype, device="cuda")

    def forward() -> torch.Tensor:
        x, residual = static_in, None
        for i in range(layers):
            normed, residual = add_rms_norm(x, residual, norms[i], 1e-6)
            x = tg.triton_flat_gemm(silu_mul(tg.triton_flat_gemm(normed, up[i], None, gemv)), down[i], None, split,
                                    workspace)
        return add_rms_norm(x, residual, norms[0], 1e-6)[0]

    static_in.copy_(inputs[0])
    forward()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    results = []
    for x in inputs:
        static_in.copy_(x)
        graph.replay()
        results.append(out.clone())
    torch.cuda.synchronize()
    return results


@hopper_only
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_pdl_chain_equals_plain_launches(rows):
    pdl.configure(enabled=False)
    expected = _chain_outputs(rows, replays=4)
    assert not all(torch.equal(expected[0], e) for e in expected[1:])  # the inputs really differ
    pdl.configure(enabled=True)
    got = _chain_outputs(rows, replays=4)
    for g, e in zip(got, expected):
        assert torch.equal(g, e), f"PDL changed the result (rows {rows})"


@hopper_only
def test_pdl_model_decode_matches_plain_launches(monkeypatch, tiny_llama):
    from thinkwise import LLM, SamplingParams

    directory, _ = tiny_llama
    prompts = [[256, 5, 9, 77, 31, 2, 200], [256] + list(range(30, 60)), [256, 1, 2, 3]]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    sampled = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=32, ignore_eos=True)

    def run() -> list[list[int]]:
        llm = LLM(str(directory), device="cuda", dtype="bfloat16", block_size=4, num_kv_blocks=512,
                  cascade_min_shared_tokens=4)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        tokens += [o.token_ids for o in llm.generate(prompts[1], sampled)[0].outputs]
        assert llm.engine.runner.graph_decoder.graphs
        return tokens

    monkeypatch.setenv("THINKWISE_PDL", "0")
    expected = run()
    monkeypatch.setenv("THINKWISE_PDL", "1")
    assert run() == expected
