"""The host's cost of presence/frequency/repetition penalties per `Sampler.draw`, on a CPU.

On a GPU, a decode step's Python overlaps the device's work under async scheduling, so what
penalties add to the host's step matters as much as what they add to the device. This runs
`benchmarks/gpu_sampler_penalties.py`'s loop (batch 64, draws one step ahead of the host,
presence 0.5 / frequency 0.3 / repetition 1.1 over 512-token prompts, temperature 1, top-k 50)
on the CPU with a small vocabulary (default 256), where the arithmetic is small and the host's
work shows, and prints side by side: microseconds per draw, plain and penalized, and their
difference; the tracker's own host time per step (`apply` without the dense penalty pass,
plus `record`); top-level aten ops per draw (torch.profiler; on a GPU each one that computes
is a kernel launch); host-to-device transfers per draw. Medians over `--steps` after 10
warm-up steps. Writes a new JSON file under $OUT or benchmarks/results (or --out).

    python benchmarks/cpu_sampler_penalties.py [--batch 64] [--vocab 256] [--steps 80]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import add_output_arguments, output_path, write_result

PROMPT_TOKENS = 512
WARMUP = 10


class _Seq:  # what the tracker keeps a weak reference to
    is_finished = False


class _Meter:
    """Counts host-to-device transfers and times the dense penalty pass (the part a GPU does in
    one kernel) by wrapping the sampler's and tracker's functions for the run; written against
    their names before and after the one-transfer tracker, so both can be measured."""

    def __init__(self):
        from thinkwise.engine import penalties, sampler

        self.transfers = 0
        self.dense = 0.0
        self.patches = []
        count = self._counting
        for module in (penalties, sampler):
            if hasattr(module, "stage_to_device"):
                self._patch(module, "stage_to_device", count(getattr(module, "stage_to_device")))
        if hasattr(penalties, "_Staging"):
            self._patch(penalties._Staging, "send", count(penalties._Staging.send))
        if hasattr(penalties, "_penalize"):
            self._patch(penalties, "_penalize", self._timing(penalties._penalize))

    def _patch(self, owner, name, value):
        self.patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def _counting(self, function):
        def counted(*args, **kwargs):
            self.transfers += 1
            return function(*args, **kwargs)

        return counted

    def _timing(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.dense += time.perf_counter() - start

        return timed

    def restore(self):
        for owner, name, value in reversed(self.patches):
            setattr(owner, name, value)


def run(batch, vocab, steps, penalties):
    from thinkwise.engine.penalties import PenaltyRow
    from thinkwise.engine.sampler import Sampler, SamplingRow

    torch.manual_seed(0)
    pool = [torch.randn(batch, vocab) * 4 for _ in range(4)]
    sampler = Sampler("cpu")
    seqs = [_Seq() for _ in range(batch)]
    prompt = torch.randint(0, vocab, (PROMPT_TOKENS,)).tolist()
    tokens = [list(prompt) for _ in range(batch)]
    meter = _Meter()
    draw_us, tracker_us, transfers, ops = [], [], [], []
    pending = None
    try:
        for step in range(WARMUP + steps + 1):
            rows = []
            for i, seq in enumerate(seqs):
                position = len(tokens[i]) - PROMPT_TOKENS + (0 if pending is None else 1)
                penalty = PenaltyRow(seq, id(seq), 0.5, 0.3, 1.1, tokens[i], PROMPT_TOKENS, position) \
                    if penalties else None
                rows.append(SamplingRow(1.0, 50, 1.0, 0.0, i, position, None, penalty=penalty))
            meter.transfers, meter.dense = 0, 0.0
            tracker = 0.0
            if step == WARMUP + steps:  # one more draw, under the profiler, for the op count
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                    drawn, _ = sampler.draw(pool[step % len(pool)], rows)
                ops.append(sum(1 for e in profile.events() if e.name.startswith("aten::") and (
                    e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))))
            else:
                with torch.inference_mode():
                    start = time.perf_counter()
                    logits = sampler.penalties.apply(pool[step % len(pool)], rows)
                    applied = time.perf_counter()
                    drawn, _ = sampler._draw(logits, rows, False)
                    drawn_at = time.perf_counter()
                    sampler.penalties.record(rows, drawn)
                    end = time.perf_counter()
                tracker = (applied - start) - meter.dense + (end - drawn_at)
                del logits  # freed here, not at the next step's assignment inside the timed span
                if step >= WARMUP:
                    draw_us.append((end - start) * 1e6)
                    tracker_us.append(tracker * 1e6)
                    transfers.append(meter.transfers)
            if pending is not None:
                for i, token in enumerate(pending.tolist()):
                    tokens[i].append(token)
            pending = drawn
    finally:
        meter.restore()
    return {"us_per_draw": statistics.median(draw_us), "tracker_host_us": statistics.median(tracker_us),
            "aten_ops_per_draw": ops[0], "h2d_transfers_per_draw": statistics.median(transfers)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    add_output_arguments(parser, "cpu_sampler_penalties")
    args = parser.parse_args()
    out = output_path(args, "cpu_sampler_penalties")
    torch.set_num_threads(args.threads)
    results = {mode: run(args.batch, args.vocab, args.steps, mode == "penalties") for mode in ("plain", "penalties")}
    plain, penalized = results["plain"], results["penalties"]
    for mode, result in results.items():
        print(f"{mode:9s}: {result['us_per_draw']:8.0f} us/draw, tracker host {result['tracker_host_us']:6.0f} us, "
              f"{result['aten_ops_per_draw']} aten ops/draw, {result['h2d_transfers_per_draw']:.0f} H2D transfers/draw")
    print(f"batch {args.batch}, vocab {args.vocab}: penalties add {penalized['us_per_draw'] - plain['us_per_draw']:.0f} "
          f"us/draw (ratio {penalized['us_per_draw'] / plain['us_per_draw']:.2f}), of which the tracker's host work "
          f"{penalized['tracker_host_us']:.0f} us and the dense pass the rest")
    write_result(out, {"batch": args.batch, "vocab": args.vocab, "steps": args.steps, "threads": args.threads,
                       "results": results})


if __name__ == "__main__":
    main()
