"""Where the GPU idles during decode steps as the engine runs them (async scheduling, PDL).

Profiles 30 engine steps with the torch profiler (CUDA activity, graph replays included),
then reports per step: the span from the first to the last GPU activity, the busy time (the
union of kernel and copy intervals: PDL kernels overlap, so their durations include time
spent waiting in `gdc_wait` and are not additive), the idle time and which pairs of kernels
the largest gaps sit between, and the most frequent kernels with their mean durations. The
profiler adds host overhead, so absolute spans run longer than unprofiled steps; the busy time
and the gap locations are what to read.

    python benchmarks/gpu_step_gaps.py qwen3-0.6b 1
"""
import argparse, collections, json, os, sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from benchmarks.common import require_cuda
from benchmarks.gpu_throughput import SHAPES, random_llm
from thinkwise import SamplingParams

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("shape", choices=sorted(SHAPES))
parser.add_argument("batch", type=int)
args = parser.parse_args()
require_cuda("gpu_step_gaps.py")
shape_name, batch = args.shape, args.batch
llm, config = random_llm(shape_name, num_kv_blocks=batch * 40, max_num_seqs=batch)
engine = llm.engine
params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
for _ in range(batch):
    engine.add_request([int(t) for t in torch.randint(0, config.vocab_size, (128,))], params)
for _ in range(40):
    engine.step()
torch.cuda.synchronize()
from torch.profiler import ProfilerActivity, profile
steps = 30
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
path = os.path.join(os.environ.get("OUT", "/tmp"), f"trace_{shape_name}_{batch}.json")
prof.export_chrome_trace(path)
events = json.load(open(path))["traceEvents"]
kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
busy, gaps, end, prev = 0.0, [], kernels[0]["ts"], None
for e in kernels:
    if e["ts"] > end:
        gaps.append((e["ts"] - end, prev["name"][:60] if prev else "", e["name"][:60]))
    if e["ts"] + e["dur"] > end:
        busy += e["ts"] + e["dur"] - max(end, e["ts"])
        end = e["ts"] + e["dur"]
        prev = e
print(f"{shape_name} b{batch}: {steps} steps, span {span / steps:.1f} us/step, busy {busy / steps:.1f} us/step, "
      f"idle {(span - busy) / steps:.1f} us/step in {len(gaps) / steps:.1f} gaps/step; kernels/step {len(kernels) / steps:.0f}")
by_pair = collections.defaultdict(lambda: [0.0, 0])
for g, a, b in gaps:
    by_pair[(a, b)][0] += g
    by_pair[(a, b)][1] += 1
for (a, b), (total, count) in sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:14]:
    print(f"  {total / steps:7.1f} us/step over {count / steps:5.1f} gaps/step: {a} -> {b}")
names = collections.Counter(e["name"][:70] for e in kernels)
durs = collections.defaultdict(float)
for e in kernels:
    durs[e["name"][:70]] += e["dur"]
for name, count in names.most_common(16):
    print(f"  {count / steps:6.1f}/step {durs[name] / count:7.2f} us avg  {name}")
os.remove(path)
