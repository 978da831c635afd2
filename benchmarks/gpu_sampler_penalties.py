"""Sampling with presence/frequency/repetition penalties vs plain sampling, same run, same GPU.

Runs the sampler's device path (`Sampler.draw`) the way async scheduling does: each step
draws on logits of a Qwen3-sized vocabulary (151,936) for `--batch` sequences, the drawn ids
go to pinned host memory with a non-blocking copy, and the host appends a step's tokens
only one step later (so every penalized draw also sees a token the host has not read yet).
Plain rows and penalized rows (presence 0.5, frequency 0.3, repetition 1.1, over prompts of
`--prompt-tokens` ids) are timed alternately for `--steps` steps each, after a warm-up, and
the ratio is printed; the issue's bar is within 5% (ratio <= 1.05). The host time spent
inside `Sampler.draw` is printed too: it tells a host-bound step (Python) from a device-bound
one. The penalized loop runs under `torch.cuda.set_sync_debug_mode("error")`, so any host
synchronization inside the sampler would abort the run. Writes a new JSON file under $OUT or benchmarks/results (or --out).

    python benchmarks/gpu_sampler_penalties.py [--batch 64] [--steps 200] [--temperature 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result

VOCAB = 151_936


class _Seq:  # what the tracker keeps a weak reference to; finished when the run ends
    is_finished = False


def run(sampler, logits_pool, seqs, tokens, prompt_len, steps, penalties, temperature, top_k):
    from thinkwise.engine.penalties import PenaltyRow
    from thinkwise.engine.sampler import SamplingRow

    pending = None  # (pinned copy, event) of the previous step: read one step later, as the engine does
    in_draw = 0.0  # host seconds inside Sampler.draw (it only queues device work)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        rows = []
        for i, seq in enumerate(seqs):
            ahead = 0 if pending is None else 1
            position = len(tokens[i]) - prompt_len + ahead
            penalty = (PenaltyRow(seq, id(seq), 0.5, 0.3, 1.1, tokens[i], prompt_len, position) if penalties else None)
            rows.append(SamplingRow(temperature, top_k, 1.0, 0.0, i, position, None, penalty=penalty))
        if penalties:
            torch.cuda.set_sync_debug_mode("error")  # a host sync inside the sampler raises here
        try:
            draw_start = time.perf_counter()
            drawn, _ = sampler.draw(logits_pool[step % len(logits_pool)], rows)
            in_draw += time.perf_counter() - draw_start
        finally:
            torch.cuda.set_sync_debug_mode("default")
        host = torch.empty(drawn.shape, dtype=drawn.dtype, pin_memory=True)
        host.copy_(drawn, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        if pending is not None:
            pending[1].synchronize()  # waits for the previous step only, as the engine's read-back does
            for i, token in enumerate(pending[0].tolist()):
                tokens[i].append(token)
        pending = (host, event)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, in_draw / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain/penalized rounds (best of)")
    add_output_arguments(parser, "gpu_sampler_penalties")
    args = parser.parse_args()
    require_cuda("gpu_sampler_penalties.py")
    out = output_path(args, "gpu_sampler_penalties")
    from thinkwise.engine.sampler import Sampler

    torch.manual_seed(0)
    logits_pool = [torch.randn(args.batch, VOCAB, device="cuda") * 4 for _ in range(8)]
    times = {"plain": [], "penalties": []}
    host = {"plain": [], "penalties": []}  # host seconds per step inside Sampler.draw
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for mode in ("plain", "penalties"):
            sampler = Sampler("cuda")
            seqs = [_Seq() for _ in range(args.batch)]
            prompt = torch.randint(0, VOCAB, (args.prompt_tokens,)).tolist()
            tokens = [list(prompt) for _ in range(args.batch)]
            seconds, in_draw = run(sampler, logits_pool, seqs, tokens, args.prompt_tokens, args.steps,
                                   mode == "penalties", args.temperature, args.top_k)
            if round_index:
                times[mode].append(seconds)
                host[mode].append(in_draw)
    plain, penalized = min(times["plain"]), min(times["penalties"])
    ratio = penalized / plain
    print(f"batch {args.batch}, vocab {VOCAB}: plain {plain * 1e3:.3f} ms/step, penalties {penalized * 1e3:.3f} "
          f"ms/step, ratio {ratio:.3f} ({'within' if ratio <= 1.05 else 'NOT within'} 5%); no host sync in the "
          "penalized sampler (sync debug mode 'error')")
    print(f"host time inside Sampler.draw: plain {min(host['plain']) * 1e6:.0f} us/step, penalties "
          f"{min(host['penalties']) * 1e6:.0f} us/step (a step is host-bound when this nears its ms/step)")
    write_result(out, {"device": torch.cuda.get_device_name(), "batch": args.batch, "vocab": VOCAB,
                       "steps": args.steps, "prompt_tokens": args.prompt_tokens, "temperature": args.temperature,
                       "top_k": args.top_k, "ms_per_step": {k: [round(v * 1e3, 4) for v in vs] for k, vs in times.items()},
                       "host_us_in_draw": {k: [round(v * 1e6, 1) for v in vs] for k, vs in host.items()},
                       "ratio": round(ratio, 4)})


if __name__ == "__main__":
    main()
