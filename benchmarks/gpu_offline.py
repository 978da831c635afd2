"""Offline throughput: 256 requests with prompt and output lengths uniform in [100, 1024].

The nano-vllm benchmark's workload (Qwen3-0.6B shape, random bf16 weights, random token
prompts, every request forced to its own output length). thinkwise gets all 256 at once
(continuous batching); transformers `generate` gets the natural batched call on the first
64 requests (left-padded, run to the longest output of the batch; only the requested
tokens count), so its rate stands for 4 such batches. Both rates are output tokens/s in
the same process. Writes JSON to $OUT (or --out).

    python benchmarks/gpu_offline.py [--requests 256] [--hf-requests 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import random
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result
from benchmarks.gpu_throughput import SHAPES, hf_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--hf-requests", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    add_output_arguments(parser, "gpu_offline")
    args = parser.parse_args()
    require_cuda("gpu_offline.py")
    out = output_path(args, "gpu_offline")
    from transformers import AutoModelForCausalLM

    from thinkwise import LLM, SamplingParams
    from thinkwise.loading.config import LoadedModel, ModelConfig

    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16).eval()
    config = ModelConfig(rms_norm_eps=1e-6, max_position_embeddings=4096, **shape)
    rng = random.Random(0)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(rng.randint(args.min_len, args.max_len))]
               for _ in range(args.requests)]
    outputs = [rng.randint(args.min_len, args.max_len) for _ in range(args.requests)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]

    llm = LLM.from_loaded(LoadedModel(config, dict(hf.state_dict()), None, None, "random", args.shape),
                          device="cuda", dtype="bfloat16", max_num_seqs=256, enable_prefix_caching=False,
                          gpu_memory_utilization=0.6)
    llm.generate(prompts[:16], [SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)] * 16)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    torch.cuda.synchronize()
    ours_s = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == sum(outputs)
    ours = produced / ours_s
    print(f"thinkwise: {produced} tokens in {ours_s:.1f} s = {ours:.0f} tok/s "
          f"({llm.engine.num_steps} steps, {llm.engine.scheduler.num_preemptions} preemptions)", flush=True)
    del llm
    torch.cuda.empty_cache()

    batch = prompts[: args.hf_requests]
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
    longest = max(outputs[: args.hf_requests])
    with torch.inference_mode():
        start = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                    pad_token_id=0)
        torch.cuda.synchronize()
        hf_s = time.perf_counter() - start
    hf_rate = sum(outputs[: args.hf_requests]) / hf_s
    report = {"device": torch.cuda.get_device_name(), "shape": args.shape, "requests": args.requests,
              "lengths": [args.min_len, args.max_len], "output_tokens": produced,
              "thinkwise_s": round(ours_s, 2), "thinkwise_tok_s": round(ours, 1),
              "transformers_requests": args.hf_requests, "transformers_s": round(hf_s, 2),
              "transformers_tok_s": round(hf_rate, 1), "thinkwise_vs_transformers": round(ours / hf_rate, 2)}
    print(json.dumps(report, indent=2))
    write_result(out, report)


if __name__ == "__main__":
    main()
