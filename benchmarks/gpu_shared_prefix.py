"""Decode step time of 16 samples sharing a 4,096-token prompt vs one sample (8B shape, random weights).

One request with a 4,096-token prompt is forked into n samples (n=1 and n=16), every sample
forced to its length. After the prefill, the script times decode steps with cascade
(shared-prefix) attention on — the prompt's KV read once per group per step — and off
(each sample reads the whole prompt), and prints the ratio to the single sample's step.
Writes JSON to $OUT (or --out).

    python benchmarks/gpu_shared_prefix.py [--shape llama3-8b] [--prompt-tokens 4096] [--samples 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result
from benchmarks.gpu_throughput import SHAPES, hf_config


def decode_step_ms(engine, prompt, n: int, steps: int, cascade: bool) -> float:
    from thinkwise import SamplingParams

    engine.runner.cascade_min_shared_tokens = 256 if cascade else None
    request = engine.add_request(prompt, SamplingParams(n=n, temperature=1.0, seed=1, max_tokens=steps + 16,
                                                        ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in request.sequences) or len(request.sequences) < n:
        engine.step()
    for _ in range(4):  # capture this shape's graphs
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / steps
    engine.abort(request.request_id)
    return elapsed * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    add_output_arguments(parser, "gpu_shared_prefix")
    args = parser.parse_args()
    require_cuda("gpu_shared_prefix.py")
    out = output_path(args, "gpu_shared_prefix")
    from transformers import AutoModelForCausalLM

    from thinkwise import LLM
    from thinkwise.loading.config import LoadedModel, ModelConfig

    shape = SHAPES[args.shape]
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16).eval()
    config = ModelConfig(rms_norm_eps=1e-6, max_position_embeddings=8192, **shape)
    blocks = (args.prompt_tokens // 16 + 4) + args.samples * (args.steps // 16 + 4) + 64
    llm = LLM.from_loaded(LoadedModel(config, dict(hf.state_dict()), None, None, "random", args.shape),
                          device="cuda", dtype="bfloat16", num_kv_blocks=blocks, max_num_seqs=max(32, args.samples),
                          enable_prefix_caching=False)
    del hf
    engine = llm.engine
    prompt = [int(t) for t in torch.randint(0, config.vocab_size, (args.prompt_tokens,))]
    one = decode_step_ms(engine, prompt, 1, args.steps, cascade=False)
    shared = decode_step_ms(engine, prompt, args.samples, args.steps, cascade=True)
    unshared = decode_step_ms(engine, prompt, args.samples, args.steps, cascade=False)
    report = {"device": torch.cuda.get_device_name(), "shape": args.shape, "prompt_tokens": args.prompt_tokens,
              "samples": args.samples, "one_sample_step_ms": round(one, 3),
              "shared_prefix_step_ms": round(shared, 3), "without_shared_prefix_step_ms": round(unshared, 3),
              "shared_vs_one": round(shared / one, 3), "without_vs_one": round(unshared / one, 3),
              "unified_max": engine.run_metadata.get("unified_max_softmax")}
    print(json.dumps(report, indent=2))
    write_result(out, report)


if __name__ == "__main__":
    main()
