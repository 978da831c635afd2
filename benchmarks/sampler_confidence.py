"""What DeepConf's token confidence adds to a sampling step: draw alone vs draw + confidence.

Times `Sampler.draw` (the device draw async scheduling uses) at a batch of rows over a
Qwen-sized vocabulary, alone and followed by `Sampler.confidence` (-mean of the top-20
logprobs per row), interleaved in the same run, and prints the two medians and their
ratio. On CUDA the times are CUDA-event spans of the launched work (no host sync inside a
repetition beyond the final event); on CPU they are wall times. The issue's target: with
confidence on, sampling at batch 64 within 5% of plain sampling on the GPU.

    python benchmarks/sampler_confidence.py --batch 64 --vocab 151936 --repeats 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import add_output_arguments, output_path, run_record
from thinkwise.engine.sampler import Sampler, SamplingRow


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=20, help="confidence's top-k (the paper's 20)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_output_arguments(parser, "sampler_confidence")
    args = parser.parse_args()
    device = torch.device(args.device)
    sampler = Sampler(device)
    logits = torch.randn(args.batch, args.vocab, device=device) * 3
    plain = [SamplingRow(temperature=args.temperature, top_k=0, top_p=1.0, min_p=0.0, seed=i, position=0,
                         logprobs=None) for i in range(args.batch)]
    confident = [SamplingRow(**{**vars(row), "confidence_k": args.top_k}) for row in plain]
    times: dict[str, list[float]] = {"draw": [], "draw+confidence": []}
    for _ in range(3):  # warm-up (allocator, kernels)
        sampler.draw(logits, plain)
        sampler.confidence(logits, confident)
    for _ in range(args.repeats):
        times["draw"].append(timed(lambda: sampler.draw(logits, plain), device))
        times["draw+confidence"].append(timed(lambda: (sampler.draw(logits, confident),
                                                       sampler.confidence(logits, confident)), device))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["draw+confidence"] / medians["draw"]
    for name, value in medians.items():
        print(f"{name:<16} {value * 1e3:9.3f} ms (median of {args.repeats})")
    print(f"ratio draw+confidence / draw: {ratio:.3f}")
    record = {**run_record(), "batch": args.batch, "vocab": args.vocab, "device": str(device),
              "medians_s": medians, "ratio": ratio}
    path = output_path(args, "sampler_confidence")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
