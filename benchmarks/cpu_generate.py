"""CPU generation speed: thinkwise vs transformers on the default model, side by side.

Both load the same GGUF in the same process and dtype, decode the same chat prompt with
every request forced to its full length (EOS ignored), and are timed the same way:
batch-1 greedy decode, then n=8 samples of one prompt. Prints tokens/s and the ratios,
and writes a new JSON file (benchmarks/results/cpu_generate-<UTC time>.json unless --out) with
the command, the machine and the versions of thinkwise, torch and transformers.

    python benchmarks/cpu_generate.py [--new-tokens 48] [--samples 8] [--dtype bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import thinkwise  # noqa: F401  (thread settings before torch)
import torch

from benchmarks.common import add_output_arguments, output_path, write_result
from thinkwise import LLM, SamplingParams
from thinkwise.loading import resolve_default_model

QUESTION = "Explain step by step how to compute 17 * 23 without a calculator."


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=48, help="forced new tokens per sample")
    parser.add_argument("--samples", type=int, default=8, help="n of the n-samples measurement")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the best is kept")
    add_output_arguments(parser, "cpu_generate")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    out = output_path(args, "cpu_generate")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    torch.set_num_threads(min(torch.get_num_threads(), 2) if torch.get_num_threads() else 2)

    gguf_path = resolve_default_model(progress=True)
    llm = LLM("default", dtype=args.dtype, device="cpu", progress=True)
    prompt_ids = llm.apply_chat_template([{"role": "user", "content": QUESTION}])
    n_new, k = args.new_tokens, args.samples

    def ours_b1():
        out = llm.generate({"prompt_token_ids": prompt_ids},
                           SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == n_new

    def ours_nk():
        out = llm.generate({"prompt_token_ids": prompt_ids},
                           SamplingParams(n=k, temperature=0.7, top_p=0.95, seed=0, max_tokens=n_new, ignore_eos=True))[0]
        assert sum(len(o.token_ids) for o in out.outputs) == k * n_new

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype).eval()
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)

    def hf_b1():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        assert out.shape[1] == ids.shape[1] + n_new

    def hf_nk():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True,
                              temperature=0.7, top_p=0.95, num_return_sequences=k)
        assert out.shape == (k, ids.shape[1] + n_new)

    results = {}
    for name, fn, tokens in [("thinkwise_batch1", ours_b1, n_new), ("transformers_batch1", hf_b1, n_new),
                             (f"thinkwise_n{k}", ours_nk, k * n_new), (f"transformers_n{k}", hf_nk, k * n_new)]:
        fn()  # warm-up (also primes thinkwise's prefix cache the same way for every run)
        best = min(time_call(fn) for _ in range(args.repeats))
        results[name] = {"seconds": round(best, 3), "tokens_per_s": round(tokens / best, 2)}
        print(f"{name:>22}: {tokens / best:8.2f} tok/s")
    ratio_b1 = results["thinkwise_batch1"]["tokens_per_s"] / results["transformers_batch1"]["tokens_per_s"]
    ratio_nk = results[f"thinkwise_n{k}"]["tokens_per_s"] / results[f"transformers_n{k}"]["tokens_per_s"]
    print(f"ratio batch-1: {ratio_b1:.2f}x   ratio n={k}: {ratio_nk:.2f}x")
    report = {
        "model": "default (Qwen2.5-Coder-0.5B-Instruct GGUF)", "dtype": args.dtype, "new_tokens": n_new,
        "prompt_tokens": len(prompt_ids), "samples": k, "results": results,
        "ratio_batch1": round(ratio_b1, 3), f"ratio_n{k}": round(ratio_nk, 3),
        "thinkwise_run_metadata": {k2: v for k2, v in llm.engine.run_metadata.items()},
    }
    write_result(out, report)


if __name__ == "__main__":
    main()
