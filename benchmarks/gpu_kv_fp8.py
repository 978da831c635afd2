"""8-bit KV cache on the GPU: decode tokens/s at long contexts, bf16 KV ("auto") vs fp8, side by side.

Random bf16 weights of a real shape (qwen3-0.6b by default, from gpu_throughput.py's SHAPES).
`--batch` prompts of `--context` random tokens are prefilled, every sequence then decodes
greedily; after `--warmup-steps` decode steps of the whole batch (CUDA graphs captured) the
next `--steps` are timed, for each `--kv-cache-dtypes` column in turn in this process, each
on a fresh engine with the same prompts. Decode at long contexts is bound by reading the KV
cache (qwen3-0.6b: 114,688 bytes a token in bf16, 59,136 in fp8 with its scales), so fp8
should approach 2x; the issue's target is >= 1.3x at batch 64 x 8k contexts.

The memory budget is explicit: the KV cache each column allocates is exactly the blocks its
batch x context needs (the same block count for both), and the plan printed first says how
many GiB each needs beside the weights. If bf16's does not fit the GPU's free memory less the
weights and `--reserve-gb` (activations, graphs, logits), the batch is lowered to the largest
that fits both columns and the line says so. Also printed: how many blocks each dtype would
get from that same budget (fp8's capacity gain), the roofline and each column's tok/s, and
the ratio fp8 / auto. `--dry-run` prints the plan for `--gpu-memory-gb` without a GPU.

Usage:
    python benchmarks/gpu_kv_fp8.py [--batch 64] [--context 8192] [--steps 64] [--kv-cache-dtypes auto,fp8]
        [--shape qwen3-0.6b] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result
from benchmarks.gpu_throughput import SHAPES, copy_bandwidth, hf_config

BLOCK_SIZE = 16
GIB = 1 << 30
# A two-layer shape for a CPU smoke run of the whole script (--device cpu --shape tiny).
TINY = dict(architecture="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, rope_theta=1e6, qk_norm=True, tie_word_embeddings=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen3-0.6b", help=f"one of {', '.join(SHAPES)} (or tiny, for --device cpu)")
    parser.add_argument("--batch", type=int, default=64, help="sequences decoding together")
    parser.add_argument("--context", type=int, default=8192, help="prompt tokens of each sequence")
    parser.add_argument("--warmup-steps", type=int, default=8, help="decode steps before timing (graph capture)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per column; the median is reported")
    parser.add_argument("--kv-cache-dtypes", default="auto,fp8", help="comma-separated columns: auto (bf16), fp8")
    parser.add_argument("--reserve-gb", type=float, default=4.0,
                        help="GiB of GPU memory kept free for activations, CUDA graphs and logits")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="with --dry-run: the GPU memory (GiB) to plan for")
    parser.add_argument("--dry-run", action="store_true", help="print the memory plan only (no GPU needed)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run with --shape tiny")
    add_output_arguments(parser, "gpu_kv_fp8")
    return parser


def model_config(args):
    from thinkwise.loading.config import ModelConfig

    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    return shape, ModelConfig(rms_norm_eps=1e-6, max_position_embeddings=max_model_len(args), **shape)


def max_tokens(args) -> int:
    # Sequences that finish their prefill early decode while the rest prefill (one prompt per
    # step), so the first ones are up to `batch` tokens ahead when timing starts.
    return args.batch + args.warmup_steps + args.steps * args.repeats + 16


def max_model_len(args) -> int:
    return args.context + max_tokens(args) + BLOCK_SIZE


def kv_bytes_per_token(config, kv_dtype: str) -> int:
    from thinkwise.cost.model_cost import ModelCostSpec
    from thinkwise.engine.config import resolve_kv_cache_dtype

    dtype = resolve_kv_cache_dtype(kv_dtype, torch.device("cpu"), torch.bfloat16)
    return ModelCostSpec.from_config(config, torch.bfloat16, kv_dtype=dtype).kv_bytes_per_token


def plan(args, config, free_bytes: int, dtypes: list[str]) -> dict:
    """The batch that fits every column and the bytes each column's KV cache takes."""
    from thinkwise.cost.model_cost import ModelCostSpec

    weights = ModelCostSpec.from_config(config, torch.bfloat16).weight_bytes
    per_token = {d: kv_bytes_per_token(config, d) for d in dtypes}
    blocks_per_seq = math.ceil(max_model_len(args) / BLOCK_SIZE)
    # Two copies of the weights at load (the random source model's and the engine's), the reserve.
    budget = free_bytes - 2 * weights - int(args.reserve_gb * GIB)
    widest = max(per_token.values())
    per_seq = blocks_per_seq * BLOCK_SIZE * widest
    batch = min(args.batch, (budget - 2 * BLOCK_SIZE * widest) // per_seq)
    if batch < 1:
        raise SystemExit(f"error: one sequence of {args.context} tokens does not fit {budget / GIB:.1f} GiB of KV "
                         "memory; lower --context")
    blocks = batch * blocks_per_seq + 1
    return {"batch": batch, "blocks": blocks, "budget_bytes": budget, "weight_bytes": weights,
            "kv_bytes_per_token": per_token,
            "kv_bytes": {d: (blocks + 1) * BLOCK_SIZE * b for d, b in per_token.items()},  # + the scratch block
            "blocks_from_budget": {d: budget // (BLOCK_SIZE * b) for d, b in per_token.items()}}


def print_plan(args, memory: dict, free_bytes: int) -> None:
    print(f"memory plan: {free_bytes / GIB:.1f} GiB free - 2 x {memory['weight_bytes'] / GIB:.2f} GiB weights - "
          f"{args.reserve_gb} GiB reserve = {memory['budget_bytes'] / GIB:.1f} GiB for the KV cache")
    for dtype, need in memory["kv_bytes"].items():
        print(f"  {dtype}: {memory['kv_bytes_per_token'][dtype]:,} B/token; batch {memory['batch']} x "
              f"{max_model_len(args)} tokens = {memory['blocks']:,} blocks = {need / GIB:.1f} GiB; the budget holds "
              f"{memory['blocks_from_budget'][dtype]:,} blocks")
    if memory["batch"] < args.batch:
        print(f"  batch {args.batch} x {args.context} does not fit in bf16: running batch {memory['batch']} x "
              f"{args.context} for every column instead")


def random_weights(shape: dict, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16).eval()
    return dict(model.state_dict())


def measure(args, config, weights: dict, kv_dtype: str, memory: dict, prompts: list[list[int]]) -> dict:
    from thinkwise import LLM, SamplingParams
    from thinkwise.loading.config import LoadedModel

    if args.device == "cuda":  # the previous column's engine must be gone (see release_memory)
        free = torch.cuda.mem_get_info()[0]
        need = memory["kv_bytes"][kv_dtype] + memory["weight_bytes"] + int(args.reserve_gb * GIB)
        if free < need:
            raise SystemExit(f"error: {kv_dtype}: {free / GIB:.1f} GiB free, {need / GIB:.1f} GiB needed; "
                             "lower --batch")
    loaded = LoadedModel(config, dict(weights), None, None, "random", args.shape)
    llm = LLM.from_loaded(loaded, device=args.device, dtype="bfloat16", kv_cache_dtype=kv_dtype,
                          num_kv_blocks=memory["blocks"], block_size=BLOCK_SIZE, max_num_seqs=len(prompts),
                          max_num_batched_tokens=max(2048, args.context), enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens(args), ignore_eos=True)
    requests = [engine.add_request(prompt, params) for prompt in prompts]
    sequences = [r.sequences[0] for r in requests]

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    while min(s.num_output_tokens for s in sequences) < 1:  # every prompt prefilled
        engine.step()
    sync()
    prefill_s = time.perf_counter() - start
    for _ in range(args.warmup_steps):
        engine.step()
    rates = []
    for _ in range(args.repeats):
        sync()
        before, start = sum(s.num_output_tokens for s in sequences), time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        sync()
        elapsed = time.perf_counter() - start
        produced = sum(s.num_output_tokens for s in sequences) - before
        if produced != args.steps * len(sequences):
            raise SystemExit(f"error: {kv_dtype}: {produced} tokens in {args.steps} steps of {len(sequences)} "
                             "sequences; the batch was not decoding whole")
        rates.append(produced / elapsed)
    mean_context = sum(s.num_tokens for s in sequences) / len(sequences)
    for request in requests:
        engine.abort(request.request_id)
    rates.sort()
    return {"kv_cache_dtype": kv_dtype, "run_metadata_kv_cache_dtype": engine.run_metadata["kv_cache_dtype"],
            "batch": len(prompts), "context_tokens_at_end": round(mean_context),
            "kv_bytes_per_token": engine.cost_spec.kv_bytes_per_token, "kv_blocks": engine.block_manager.num_blocks,
            "kv_cache_gb": round(memory["kv_bytes"][kv_dtype] / GIB, 2), "prefill_s": round(prefill_s, 2),
            "decode_tok_s": round(rates[len(rates) // 2], 1), "runs_tok_s": [round(r, 1) for r in rates],
            "step_ms": round(1e3 * len(prompts) / rates[len(rates) // 2], 3),
            "weight_bytes": engine.cost_spec.weight_bytes}


def release_memory(args) -> None:
    """Free the last column's engine: it holds reference cycles (bound methods between its
    parts), so its KV cache goes only when the cycle collector runs, not when it goes out of scope."""
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    args = build_parser().parse_args()
    dtypes = [d.strip() for d in args.kv_cache_dtypes.split(",") if d.strip()]
    from thinkwise.engine.config import EngineConfig
    from thinkwise.errors import InvalidParameterError

    try:
        for dtype in dtypes:
            EngineConfig(kv_cache_dtype=dtype)
    except InvalidParameterError as error:
        raise SystemExit(f"error: --kv-cache-dtypes: {error.message}") from None
    if args.shape not in SHAPES and args.shape != "tiny":
        raise SystemExit(f"error: --shape {args.shape!r} is not one of {', '.join(SHAPES)}")
    shape, config = model_config(args)
    if args.dry_run:
        free = int(args.gpu_memory_gb * GIB)
        print_plan(args, plan(args, config, free, dtypes), free)
        return
    if args.device == "cuda":
        require_cuda("gpu_kv_fp8.py")
    out = output_path(args, "gpu_kv_fp8")
    free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else int(args.gpu_memory_gb * GIB)
    memory = plan(args, config, free, dtypes)
    print_plan(args, memory, free)
    bandwidth = copy_bandwidth() if args.device == "cuda" else None
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (args.context,), generator=generator).tolist()
               for _ in range(memory["batch"])]
    weights = random_weights(shape, args.device)
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "shape": args.shape,
              "requested_batch": args.batch, "context": args.context, "steps": args.steps,
              "warmup_steps": args.warmup_steps, "memory_plan": {k: v for k, v in memory.items()},
              "copy_bandwidth_GBps": round(bandwidth / 1e9, 1) if bandwidth else None, "results": []}
    for dtype in dtypes:
        row = measure(args, config, weights, dtype, memory, prompts)
        if bandwidth:  # every step reads the weights once and each sequence's whole context
            step_bytes = row["weight_bytes"] + row["batch"] * row["context_tokens_at_end"] * row["kv_bytes_per_token"]
            row["roofline_tok_s"] = round(row["batch"] * bandwidth / step_bytes, 1)
        report["results"].append(row)
        print(json.dumps(row))
        release_memory(args)
    rates = {r["kv_cache_dtype"]: r["decode_tok_s"] for r in report["results"]}
    base = rates.get("auto")
    for dtype, rate in rates.items():
        line = f"{dtype}: {rate} tok/s decoding batch {memory['batch']} at {args.context}+ tokens of context"
        if base and dtype != "auto":
            report.setdefault("ratios", {})[dtype] = round(rate / base, 3)
            line += f" = {rate / base:.2f}x auto (bf16) (issue target >= 1.3x)"
        print(line)
    write_result(out, report)


if __name__ == "__main__":
    main()
