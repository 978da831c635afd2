"""GPU decode throughput: thinkwise vs transformers vs the HBM roofline, one run, random weights.

Random bf16 weights of real shapes (speed does not depend on the values), 128-token
prompts, every request forced to its length (EOS ignored). For each shape and batch size
it measures thinkwise's decode tokens/s, transformers' `generate` on the same shapes in
the same process, and the roofline: measured device-copy bandwidth over the bytes one
decode step must read (all weights once, as stored + every sequence's KV). With
`--quantization none,int8,int4` each shape is also run with its weights quantized on load
(thinkwise/kernels/linear_methods), one engine after another in the same process, and the
tokens/s of each method over the 16-bit column's at the same batch size are printed.
Prints ratios and writes JSON to $OUT (or --out).

    python benchmarks/gpu_throughput.py [--shapes qwen3-0.6b,llama3-8b] [--batches 1,64] [--new-tokens 256]
        [--quantization none,int8,int4] [--extras none,confidence,penalties] [--prefill-split] [--candidate-tilings]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import add_output_arguments, output_path, require_cuda, write_result

SHAPES = {
    "qwen3-0.6b": dict(architecture="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6, qk_norm=True,
                       tie_word_embeddings=True),
    "llama3-8b": dict(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e5,
                      tie_word_embeddings=False),
}


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    src = torch.randn(512 * 1024 * 1024 // 4, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    return 2 * src.numel() * 4 / seconds


def hf_config(shape: dict):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                  intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                  num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                  max_position_embeddings=4096, rope_theta=shape["rope_theta"],
                  tie_word_embeddings=shape["tie_word_embeddings"], rms_norm_eps=1e-6)
    if shape["architecture"] == "qwen3":
        return Qwen3Config(head_dim=shape["head_dim"], **common)
    return LlamaConfig(**common)


def random_llm(shape_name: str, num_kv_blocks: int, max_num_seqs: int, quantization: str | None = None):
    """(LLM, its ModelConfig) on random bf16 weights of a real shape, quantized on load where
    `quantization` names a method (for the probes; main() keeps its transformers model for the
    comparison, so it builds its own)."""
    from transformers import AutoModelForCausalLM

    from thinkwise import LLM
    from thinkwise.loading.config import LoadedModel, ModelConfig

    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16).eval()
    config = ModelConfig(rms_norm_eps=1e-6, max_position_embeddings=4096, **shape)
    loaded = LoadedModel(config, dict(hf.state_dict()), None, None, "random", shape_name)
    return LLM.from_loaded(loaded, device="cuda", dtype="bfloat16", num_kv_blocks=num_kv_blocks,
                           max_num_seqs=max_num_seqs, enable_prefix_caching=False,
                           quantization=quantization), config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen3-0.6b,llama3-8b")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--quantization", default="none",
                        help="comma-separated weight methods per shape: none (16-bit), int8, int4, int4-g64, int4-g128; "
                             "transformers runs beside the 16-bit column only")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample (temperature 0.7, this top-p, seeded) instead of greedy; thinkwise only")
    parser.add_argument("--extras", default="none",
                        help="comma-separated sampling extras timed side by side per shape and batch: none, "
                             "confidence (DeepConf top-20 token confidence), penalties (presence 0.5, frequency 0.5, "
                             "repetition 1.1); ratios against 'none' are printed")
    parser.add_argument("--sync-too", action="store_true",
                        help="also time thinkwise with async scheduling off (same engine, same graphs)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time thinkwise this many times per point and report the median (all runs are kept)")
    parser.add_argument("--prefill-split", action="store_true",
                        help="also time the same requests with one new token (prefill and a first token) and "
                             "report prefill seconds and decode ms a step, so a quantized column shows where it "
                             "gains or loses")
    parser.add_argument("--candidate-tilings", action="store_true",
                        help="also offer the quantized GEMM tilings not yet timed on a GPU "
                             "(triton_quant_gemm.WEIGHT_B_CANDIDATES) to the engine's start-up table, whose picks "
                             "each row's gemm_dispatch records")
    add_output_arguments(parser, "gpu_throughput")
    args = parser.parse_args()
    require_cuda("gpu_throughput.py")
    if args.candidate_tilings:  # an A/B switch of this benchmark: the engine itself offers DEFAULT_CONFIGS only
        from thinkwise.kernels import triton_quant_gemm as tq

        tq.DEFAULT_CONFIGS = tuple(dict.fromkeys([*tq.DEFAULT_CONFIGS, *tq.WEIGHT_B_CANDIDATES]))
    out = output_path(args, "gpu_throughput")

    from transformers import AutoModelForCausalLM

    from thinkwise.loading.config import LoadedModel, ModelConfig

    bandwidth = copy_bandwidth()
    report = {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
              "torch": torch.__version__, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "candidate_tilings": args.candidate_tilings, "results": []}
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    batches = [int(b) for b in args.batches.split(",")]
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        torch.manual_seed(0)
        with torch.device("cuda"):
            hf = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16).eval()
        config = ModelConfig(rms_norm_eps=1e-6, max_position_embeddings=4096, **shape)
        for quantization in [q.strip() for q in args.quantization.split(",") if q.strip()]:
            # The engine empties the weights dict it loads from: a fresh dict (same tensors) per column.
            loaded = LoadedModel(config, dict(hf.state_dict()), None, None, "random", shape_name)
            run_shape(args, llm_for(loaded, quantization, batches, args), hf, config, shape_name, quantization,
                      batches, bandwidth, report)
            torch.cuda.empty_cache()
        del hf
        torch.cuda.empty_cache()
    print_quantization_ratios(report["results"])
    print_extras_ratios(report["results"])
    write_result(out, report)


def llm_for(loaded, quantization: str, batches: list[int], args):
    from thinkwise import LLM

    blocks = max(batches) * ((args.prompt_tokens + args.new_tokens) // 16 + 2) + 64
    return LLM.from_loaded(loaded, device="cuda", dtype="bfloat16", num_kv_blocks=blocks, max_num_seqs=max(batches),
                           enable_prefix_caching=False, quantization=None if quantization == "none" else quantization)


def print_quantization_ratios(rows: list[dict]) -> None:
    """Each quantized column's tokens/s over the 16-bit column's, same shape and batch; stored in its row."""
    rows = [r for r in rows if r["extras"] == "none"]
    base = {(r["shape"], r["batch"]): r["thinkwise_tok_s"] for r in rows if r["quantization"] == "none"}
    split = {(r["shape"], r["batch"]): r for r in rows if r["quantization"] == "none" and "prefill_s" in r}
    for row in rows:
        key = (row["shape"], row["batch"])
        if row["quantization"] != "none" and key in base:
            row["vs_bf16"] = round(row["thinkwise_tok_s"] / base[key], 3)
            print(f"{row['shape']} batch {row['batch']}: {row['quantization']} {row['thinkwise_tok_s']} tok/s = "
                  f"{row['vs_bf16']:.2f}x bf16 ({base[key]} tok/s)")
            if "prefill_s" in row and key in split:
                bf16 = split[key]
                print(f"    prefill {row['prefill_s']} s vs {bf16['prefill_s']} s, decode "
                      f"{row['decode_ms_per_step']} vs {bf16['decode_ms_per_step']} ms a step")


def prefill_split(timed, params, batch: int, new_tokens: int, rate: float, repeats: int) -> dict:
    """Prefill seconds (the median of `repeats` runs of the same requests with one new token:
    prefill and the first token) and decode ms a step (the rest of the full run, `rate` tok/s,
    over its other new_tokens - 1 steps)."""
    one = dataclasses.replace(params, max_tokens=1)
    prefill = statistics.median(batch / timed(one, 1)[0] for _ in range(repeats))
    full = batch * new_tokens / rate
    return {"prefill_s": round(prefill, 4), "full_s": round(full, 4),
            "decode_ms_per_step": round((full - prefill) * 1e3 / max(1, new_tokens - 1), 3)}


EXTRAS = {"none": {}, "confidence": {"confidence_top_k": 20},
          "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}}


def print_extras_ratios(rows: list[dict]) -> None:
    """Each sampling extra's tokens/s over plain sampling's, same shape, method and batch; stored in its row."""
    base = {(r["shape"], r["quantization"], r["batch"]): r["thinkwise_tok_s"] for r in rows if r["extras"] == "none"}
    for row in rows:
        key = (row["shape"], row["quantization"], row["batch"])
        if row["extras"] != "none" and key in base:
            row["vs_plain"] = round(row["thinkwise_tok_s"] / base[key], 3)
            print(f"{row['shape']} batch {row['batch']} ({row['sampling']}): {row['extras']} "
                  f"{row['thinkwise_tok_s']} tok/s = {row['vs_plain']:.3f}x plain ({base[key]} tok/s)")


def run_shape(args, llm, hf, config, shape_name: str, quantization: str, batches: list[int], bandwidth: float,
              report: dict) -> None:
    from thinkwise import SamplingParams
    from thinkwise.kernels import pdl

    weight_bytes = llm.engine.cost_spec.weight_bytes  # as stored: quantized layers at their own bytes
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    for batch, extras in [(b, e.strip()) for b in batches for e in args.extras.split(",") if e.strip()]:
        if extras not in EXTRAS:
            raise SystemExit(f"--extras: unknown {extras!r}; use {', '.join(EXTRAS)}")
        torch.manual_seed(batch)  # the same prompts for every quantization column
        prompts = [[int(t) for t in torch.randint(0, config.vocab_size, (args.prompt_tokens,))] for _ in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, **EXTRAS[extras])
        if args.top_p is not None:
            params = SamplingParams(temperature=0.7, top_p=args.top_p, seed=1, max_tokens=args.new_tokens,
                                    ignore_eos=True, **EXTRAS[extras])
        # Warm-up with the same shapes, so CUDA graphs of every batch/context bucket are
        # captured before timing (capture is a one-time cost per bucket).
        llm.generate(prompts, params)

        def timed(params=params, new_tokens=args.new_tokens) -> tuple[float, list]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            torch.cuda.synchronize()
            assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
            return batch * new_tokens / (time.perf_counter() - start), outputs

        runs = [timed() for _ in range(max(1, args.repeats))]
        rates = sorted(rate for rate, _ in runs)
        ours, outputs = rates[len(rates) // 2], runs[0][1]
        mean_context = args.prompt_tokens + args.new_tokens / 2
        step_bytes = weight_bytes + batch * mean_context * kv_per_token
        roofline = batch * bandwidth / step_bytes
        row = {"shape": shape_name, "quantization": quantization, "batch": batch, "extras": extras,
               "thinkwise_tok_s": round(ours, 1),
               "roofline_tok_s": round(roofline, 1), "thinkwise_vs_roofline": round(ours / roofline, 3),
               "async_scheduling": llm.engine.async_scheduling,
               "pdl": pdl.pdl_enabled(torch.device("cuda"), batch),
               "sampling": "greedy" if args.top_p is None else f"temperature 0.7, top_p {args.top_p}"}
        if len(rates) > 1:
            row["runs_tok_s"] = [round(rate, 1) for rate in rates]
        if args.prefill_split:
            row.update(prefill_split(timed, params, batch, args.new_tokens, ours, max(1, args.repeats)))
        if batch == batches[0] and extras == "none":  # which GEMM each weight shape runs, from the start-up profile
            gemms = llm.engine.run_metadata.get("gemm_dispatch", {})
            row["gemm_dispatch"] = {"implementations": gemms.get("implementations"),
                                    "timings_us": gemms.get("timings_us")}
            row["linear_methods"] = {k: llm.engine.run_metadata["linear_methods"].get(k) for k in ("method", "counts")}
        if args.sync_too and llm.engine.async_scheduling:
            llm.engine.async_scheduling = False
            sync_rate, sync_outputs = timed()
            llm.engine.async_scheduling = True
            same = [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in sync_outputs]
            row.update(sync_tok_s=round(sync_rate, 1), async_over_sync=round(ours / sync_rate, 3),
                       same_tokens_as_sync=same)
        if not args.skip_hf and args.top_p is None and quantization == "none" and extras == "none":
            ids = torch.tensor(prompts, device="cuda")
            with torch.inference_mode():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                            do_sample=False)
                torch.cuda.synchronize()
                start = time.perf_counter()
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False)
                torch.cuda.synchronize()
            hf_rate = batch * args.new_tokens / (time.perf_counter() - start)
            row.update(transformers_tok_s=round(hf_rate, 1), thinkwise_vs_transformers=round(ours / hf_rate, 2))
        report["results"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("gemm_dispatch", "linear_methods")}))


if __name__ == "__main__":
    main()
