"""Where a decode step's time goes on the GPU: scheduling, the forward (graph), sampling, bookkeeping.

    python benchmarks/gpu_step_profile.py [--shape llama3-8b] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.gpu_throughput import SHAPES, hf_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from thinkwise import LLM, SamplingParams
    from thinkwise.loading.config import LoadedModel, ModelConfig

    shape = SHAPES[args.shape]
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16).eval()
    config = ModelConfig(rms_norm_eps=1e-6, max_position_embeddings=4096, **shape)
    llm = LLM.from_loaded(LoadedModel(config, dict(hf.state_dict()), None, None, "random", args.shape),
                          device="cuda", dtype="bfloat16", num_kv_blocks=args.batch * 40, max_num_seqs=args.batch,
                          enable_prefix_caching=False)
    del hf
    engine = llm.engine
    prompts = [[int(t) for t in torch.randint(0, config.vocab_size, (128,))] for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(8):
        engine.step()  # capture graphs for these shapes
    timings = {"schedule": 0.0, "forward": 0.0, "sample+rest": 0.0}
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
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    timings["sample+rest"] = total - timings["forward"] - timings["schedule"]
    print(f"{args.shape} batch {args.batch}: {1e3 * total / args.steps:.2f} ms/step, "
          f"{args.batch * args.steps / total:.0f} tok/s decode-only; per step: "
          + ", ".join(f"{k} {1e3 * v / args.steps:.2f} ms" for k, v in timings.items()))
    print("graphs captured:", sorted(runner.graph_decoder.graphs))


if __name__ == "__main__":
    main()
