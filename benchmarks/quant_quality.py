"""Quality of quantized weights: perplexity and greedy agreement vs the 16-bit model.

Loads the model once per `--quantization` column (in this process, one after another),
scores a fixed text and compares with the 16-bit column:
- perplexity over the text, cut into windows of --window tokens, each scored by one
  prefill (every position predicts the next token), so all columns see identical inputs;
- teacher-forced top-1 agreement: the share of positions whose argmax equals 16-bit's;
- greedy agreement: free-running greedy continuations of a few prompts, the share of
  tokens equal to 16-bit's before the first divergence, and the mean first divergence.
The text is this repository's README.md (or --text FILE), tokenized by the model; its
sha256 is recorded. No download. Writes JSON (benchmarks/results/quant_quality-<UTC>.json).
A column METHOD:KV also sets the KV cache dtype (`none:fp8`: 16-bit weights, 8-bit KV cache).

    python benchmarks/quant_quality.py [--quantization none,int8,int4,int4-all,gguf] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import thinkwise  # noqa: F401  (thread settings before torch)
import torch

from benchmarks.common import add_output_arguments, output_path, write_result
from thinkwise import LLM, SamplingParams

PROMPTS = ("Write a Python function that returns the n-th Fibonacci number.",
           "Explain step by step how to compute 17 * 23 without a calculator.",
           "What is the difference between a list and a tuple in Python?")


def window_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of one uncached, unchunked prefill of `ids`."""
    request = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=1))
    batch = engine.scheduler.schedule()
    if batch.num_new_tokens != [len(ids)]:
        raise RuntimeError("the window was cached or chunked; lower --window or disable the prefix cache")
    runner = engine.runner
    inputs, positions, metadata, _ = runner.prepare(batch.sequences, batch.num_new_tokens)
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(inputs, positions, runner.kv_caches, metadata))
    engine.abort(request.request_id)
    return logits.float()


def score(llm: LLM, ids: list[int], window: int) -> tuple[float, list[int], int]:
    """(total negative log-likelihood, argmax per scored position, positions scored)."""
    nll, argmax, count = 0.0, [], 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = window_logits(llm.engine, chunk[:-1])
        targets = torch.tensor(chunk[1:])
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        argmax += logits.argmax(-1).tolist()
        count += len(targets)
    return nll, argmax, count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--quantization", default="none,int8,int4,int4-all,gguf",
                        help="comma-separated columns METHOD[:KV_CACHE_DTYPE] (none:fp8 = 16-bit weights, fp8 KV "
                             "cache); the first is the reference (use none)")
    parser.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens of the text scored")
    parser.add_argument("--window", type=int, default=512, help="tokens per scored prefill")
    parser.add_argument("--greedy-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    add_output_arguments(parser, "quant_quality")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    out = output_path(args, "quant_quality")
    text = Path(args.text).read_text()
    columns = [c.strip() for c in args.quantization.split(",") if c.strip()]
    results: dict[str, dict] = {}
    reference: dict | None = None
    for column in columns:
        start = time.perf_counter()
        method, _, kv_cache_dtype = column.partition(":")
        llm = LLM(args.model, device=args.device, quantization=None if method == "none" else method,
                  kv_cache_dtype=kv_cache_dtype or "auto", enable_prefix_caching=False)
        load_s = time.perf_counter() - start
        ids = llm.tokenizer(text)["input_ids"][: args.max_tokens]
        nll, argmax, count = score(llm, ids, args.window)
        greedy = []
        for prompt in PROMPTS:
            prompt_ids = llm.apply_chat_template([{"role": "user", "content": prompt}])
            output = llm.generate({"prompt_token_ids": prompt_ids},
                                  SamplingParams(temperature=0, max_tokens=args.greedy_tokens, ignore_eos=True))[0]
            greedy.append(list(output.outputs[0].token_ids))
        row = {"perplexity": round(math.exp(nll / count), 4), "tokens_scored": count, "load_s": round(load_s, 1),
               "linear_methods": {k: llm.engine.run_metadata["linear_methods"].get(k) for k in ("method", "counts")},
               "kv_cache_dtype": llm.engine.run_metadata["kv_cache_dtype"]}
        if reference is None:
            reference = {"nll": nll, "argmax": argmax, "greedy": greedy, "column": column}
        else:
            agree = sum(a == b for a, b in zip(argmax, reference["argmax"])) / len(argmax)
            firsts = []
            for ours, theirs in zip(greedy, reference["greedy"]):
                first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
                firsts.append(first)
            row.update({
                "perplexity_vs_reference": round(math.exp((nll - reference["nll"]) / count), 4),
                "top1_agreement": round(agree, 4),
                "greedy_tokens_equal_before_divergence": round(sum(firsts) / (len(firsts) * args.greedy_tokens), 4),
                "greedy_first_divergence": firsts,
            })
        results[column] = row
        shown = {k: v for k, v in row.items() if k not in ("linear_methods",)}
        print(f"{column:>10}: {shown}", flush=True)
        del llm
        gc.collect()
    write_result(out, {"model": args.model, "text": args.text, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                       "window": args.window, "greedy_tokens": args.greedy_tokens, "reference": columns[0],
                       "results": results})


if __name__ == "__main__":
    main()
