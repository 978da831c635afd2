"""Where a decode step's time goes on the GPU: scheduling, the forward (graph), sampling, bookkeeping.

    python benchmarks/gpu_step_profile.py [--shape llama3-8b] [--batch 64] [--quantization int8] [--kernels]
        [--linears]

`--linears` also captures a graph of only the step's linear layers (each layer's q/k/v, o,
gate/up with its SiLU * up, and down projections, then the LM head, on fixed inputs of the
batch's rows) and prints its replay time beside the whole graph's: how much of a step the
weight reads take and how much everything else adds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import require_cuda
from benchmarks.gpu_throughput import SHAPES, hf_config
from thinkwise.errors import InvalidParameterError
from thinkwise.kernels.linear_methods import parse_quantization


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--cprofile", action="store_true", help="print the top host functions of the timed steps")
    parser.add_argument("--kernels", action="store_true", help="print the GPU kernels of one graph replay")
    parser.add_argument("--quantization", default="none", help="weights quantized on load: none, int8, int4, ...")
    parser.add_argument("--linears", action="store_true",
                        help="also time a graph of only the linear layers (the weight reads of a step)")
    args = parser.parse_args()
    try:  # before the GPU check and the minutes of model building: a typo fails at once
        parse_quantization(args.quantization)
    except InvalidParameterError as error:
        parser.error(str(error))
    require_cuda("gpu_step_profile.py")
    from transformers import AutoModelForCausalLM

    from thinkwise import LLM, SamplingParams
    from thinkwise.loading.config import LoadedModel, ModelConfig

    shape = SHAPES[args.shape]
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16).eval()
    config = ModelConfig(rms_norm_eps=1e-6, max_position_embeddings=4096, **shape)
    llm = LLM.from_loaded(LoadedModel(config, dict(hf.state_dict()), None, None, "random", args.shape),
                          device="cuda", dtype="bfloat16", num_kv_blocks=args.batch * 40, max_num_seqs=args.batch,
                          enable_prefix_caching=False,
                          quantization=None if args.quantization == "none" else args.quantization)
    del hf
    engine = llm.engine
    # Profile the phases of a synchronous step (async scheduling would hide them behind
    # the GPU and route decode steps around the wrapped functions).
    engine.async_scheduling = False
    prompts = [[int(t) for t in torch.randint(0, config.vocab_size, (128,))] for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(8):
        engine.step()  # capture graphs for these shapes
    timings = {"schedule": 0.0, "forward": 0.0}
    runner = engine.runner
    original_execute = runner.execute

    def timed_execute(*a, **k):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = original_execute(*a, **k)
        torch.cuda.synchronize()
        timings["forward"] += time.perf_counter() - start
        return out

    runner.execute = timed_execute
    original_schedule = engine.scheduler.schedule

    def timed_schedule():
        start = time.perf_counter()
        out = original_schedule()
        timings["schedule"] += time.perf_counter() - start
        return out

    engine.scheduler.schedule = timed_schedule
    original_sampler = engine.sampler

    def timed_sampler(*a, **k):
        start = time.perf_counter()
        out = original_sampler(*a, **k)
        timings["sampler"] = timings.get("sampler", 0.0) + time.perf_counter() - start
        return out

    engine.sampler = timed_sampler
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    # The forward alone: replay the captured graph of this batch back to back (GPU time only).
    decoder = runner.graph_decoder
    if decoder is not None and decoder.graphs:
        entry = max(decoder.graphs.items(), key=lambda kv: kv[0])[1]
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(32):
            entry.graph.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"graph replay alone: {begin.elapsed_time(end) / 32:.3f} ms")
        if args.linears:
            print(f"graph of the linear layers alone: {linear_graph_ms(runner.model, config, args.batch):.3f} ms")
        if args.kernels:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as trace:
                for _ in range(4):
                    entry.graph.replay()
                torch.cuda.synchronize()
            print(trace.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    timings["rest"] = total - timings["forward"] - timings["schedule"] - timings.get("sampler", 0.0)
    print(f"{args.shape} batch {args.batch} {args.quantization}: {1e3 * total / args.steps:.2f} ms/step, "
          f"{args.batch * args.steps / total:.0f} tok/s decode-only; per step: "
          + ", ".join(f"{k} {1e3 * v / args.steps:.2f} ms" for k, v in timings.items()))
    print("graphs captured:", sorted(runner.graph_decoder.graphs))


def linear_chain(model, config, rows: int, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """A callable running only the model's linear layers in step order (each layer's q/k/v, o,
    gate/up with SiLU * up, down; then the LM head) on fixed random inputs of `rows` rows,
    returning their outputs."""
    hidden = torch.randn(rows, config.hidden_size, device=device, dtype=dtype)
    heads = torch.randn(rows, model.layers[0].self_attn.q_size, device=device, dtype=dtype)
    inner = torch.randn(rows, config.intermediate_size, device=device, dtype=dtype)

    def chain() -> list[torch.Tensor]:
        outs = []
        for layer in model.layers:
            outs.append(layer.self_attn.qkv_proj(hidden))
            outs.append(layer.self_attn.o_proj(heads))
            outs.append(layer.mlp.gate_up_proj.forward_gated(hidden, "silu"))
            outs.append(layer.mlp.down_proj(inner))
        outs.append(model.lm_head(hidden))
        return outs

    return chain


def linear_graph_ms(model, config, rows: int) -> float:
    """GPU ms of one replay of a CUDA graph holding only `linear_chain` (launched as the engine
    launches them, PDL included; the median of `cuda_graph_time_us`'s replays): the step's weight
    reads without its norms, attention and sampling."""
    from thinkwise.kernels.linear_dispatch import cuda_graph_time_us

    with torch.inference_mode():
        return cuda_graph_time_us([linear_chain(model, config, rows, torch.device("cuda"))]) / 1e3

if __name__ == "__main__":
    main()
