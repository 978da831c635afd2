"""Host vs GPU per decode step at batch 1: is the engine GPU-bound?

Runs the engine (async scheduling, CUDA graphs) on random weights of a real shape and
reports per step: the wall time, the time the host sat blocked waiting for a step's tokens
(near zero means the host is the bottleneck), the host's time in launching the step behind
and in reading one back, and the GPU time of one graph replay, the decode graph replayed
back to back. Steps are timed after the graphs of every context width they use were
captured. A/B runs switch the kernel knobs by their environment overrides (THINKWISE_PDL,
THINKWISE_GEMM_EPILOGUE; see thinkwise/engine/env_overrides.py).

    python benchmarks/gpu_host_vs_gpu.py qwen3-0.6b [--quantization int8] [--cprofile]
"""
import argparse, json, sys, time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from benchmarks.common import require_cuda
from benchmarks.gpu_throughput import SHAPES, random_llm
from thinkwise import SamplingParams
from thinkwise.engine import step_pipeline
from thinkwise.errors import InvalidParameterError
from thinkwise.kernels.linear_methods import parse_quantization

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("shape", nargs="?", default="qwen3-0.6b", choices=sorted(SHAPES))
parser.add_argument("--quantization", default="none", help="weights quantized on load: none, int8, int4, ...")
parser.add_argument("--cprofile", action="store_true", help="then profile 30 more steps and print their top host functions")
args = parser.parse_args()
shape_name = args.shape
try:  # before the GPU check and the model building: a typo fails at once
    parse_quantization(args.quantization)
except InvalidParameterError as error:
    parser.error(str(error))
require_cuda("gpu_host_vs_gpu.py")
llm, config = random_llm(shape_name, num_kv_blocks=64, max_num_seqs=1,
                         quantization=None if args.quantization == "none" else args.quantization)
engine = llm.engine
waits = []
real_read = step_pipeline.InflightStep.read
def read(self):
    t = time.perf_counter()
    if self.copied is not None:
        self.copied.synchronize()
    waits.append(time.perf_counter() - t)
    return real_read(self)
step_pipeline.InflightStep.read = read
params = SamplingParams(temperature=0, max_tokens=600, ignore_eos=True)
engine.add_request([int(t) for t in torch.randint(0, config.vocab_size, (128,))], params)
phases = {"launch_behind": 0.0, "read_back": 0.0}
for name in list(phases):
    real = getattr(engine.pipeline, name)
    def timed(*a, _real=real, _name=name, **k):
        t = time.perf_counter()
        try:
            return _real(*a, **k)
        finally:
            phases[_name] += time.perf_counter() - t
    setattr(engine.pipeline, name, timed)
for _ in range(150):  # past 256 tokens: the width-32 graph is captured before timing
    engine.step()
waits.clear()
for k in phases:
    phases[k] = 0.0
torch.cuda.synchronize()
n = 200
t0 = time.perf_counter()
for _ in range(n):
    engine.step()
torch.cuda.synchronize()
wall = (time.perf_counter() - t0) / n
wait = sum(waits) / n
gd = engine.runner.graph_decoder
entry = list(gd.graphs.values())[-1]
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for _ in range(10):
    entry.graph.replay()
start.record()
for _ in range(200):
    entry.graph.replay()
end.record()
torch.cuda.synchronize()
replay = start.elapsed_time(end) * 1e3 / 200
print(json.dumps({"shape": shape_name, "quantization": args.quantization, "epilogue": int(engine.config.gemm_epilogue_fusion),
                  "pdl": int(engine.config.pdl), "wall_us": round(wall * 1e6, 1),
                  "blocked_us": round(wait * 1e6, 1), "host_us": round((wall - wait) * 1e6, 1),
                  "graph_replay_us": round(replay, 1),
                  **{k + "_us": round(v * 1e6 / n, 1) for k, v in phases.items()}, "graphs": [str(k) for k in gd.graphs]}))
if args.cprofile:  # after the figures above, which the profiler's own cost must not enter
    import cProfile, pstats
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(30):  # within the context widths already captured (no graph capture profiled)
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
