"""LayerCast's price: bf16 compute vs fp32 compute over the same bf16 weights, side by side.

One process loads the model twice (`compute_dtype` None, then "float32"), decodes a chat
prompt with EOS ignored, batch 1 greedy and n samples of one prompt, and prints tokens/s
and the ratio. It also checks what LayerCast buys: a seeded sample generated alone and
again batched with other prompts, the same tokens or not, in each mode. JSON goes to a new
file under benchmarks/results/ (never over an existing one).

    python benchmarks/compute_dtype.py                       # CPU, the default model
    python benchmarks/compute_dtype.py --device cuda --shape qwen3-0.6b   # GPU, random weights
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import thinkwise  # noqa: F401  (thread settings before torch)
import torch
import transformers

from thinkwise import LLM, SamplingParams

QUESTION = "Explain step by step how to compute 17 * 23 without a calculator."
OTHER_QUESTIONS = ["Name three prime numbers.", "Write a haiku about the sea.", "What is a linked list?"]
SHAPES = {  # random-weight models of real shapes for the GPU (nothing is downloaded)
    "qwen3-0.6b": dict(architecture="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, qk_norm=True,
                       tie_word_embeddings=True),
}


def build(args, compute_dtype):
    options = dict(device=args.device, dtype="bfloat16", compute_dtype=compute_dtype, enable_prefix_caching=False)
    if args.shape is None:
        return LLM(args.model, **options)
    from transformers import AutoModelForCausalLM, Qwen3Config

    from thinkwise.loading.config import LoadedModel, ModelConfig

    shape = SHAPES[args.shape]
    config = ModelConfig(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, **shape)
    hf_config = Qwen3Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                            intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                            num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                            head_dim=shape["head_dim"], tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    loaded = LoadedModel(config, dict(hf.state_dict()), None, None, "random", args.shape)
    return LLM.from_loaded(loaded, num_kv_blocks=2048, **options)


def prompts_of(llm, questions):
    if llm.tokenizer is None:  # random weights: token ids stand in for text
        return [{"prompt_token_ids": [(7 * i + 3 * j) % 1000 + 10 for j in range(40 + 5 * i)]}
                for i, _ in enumerate(questions)]
    return [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": q}])} for q in questions]


def timed(llm, prompt, params) -> float:
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    if llm.engine.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(o.token_ids) for o in out.outputs) / (time.perf_counter() - start)


def measure(args, compute_dtype) -> dict:
    llm = build(args, compute_dtype)
    prompt, *others = prompts_of(llm, [QUESTION] + OTHER_QUESTIONS)
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    sampled = SamplingParams(n=args.samples, temperature=0.7, top_p=0.95, seed=0, max_tokens=args.new_tokens,
                             ignore_eos=True)
    timed(llm, prompt, SamplingParams(temperature=0, max_tokens=4))  # warm-up
    batch1 = max(timed(llm, prompt, greedy) for _ in range(args.repeats))
    samples = max(timed(llm, prompt, sampled) for _ in range(args.repeats))
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=args.new_tokens, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    mixed = [SamplingParams(temperature=0.8, seed=100 + i, max_tokens=args.new_tokens, ignore_eos=True)
             for i in range(len(others))]
    batched = llm.generate(others[:1] + [prompt] + others[1:], mixed[:1] + [seeded] + mixed[1:])[1].outputs[0].token_ids
    first_difference = next((i for i, (a, b) in enumerate(zip(alone, batched)) if a != b), None)
    return {"compute_dtype": str(llm.engine.dtype), "batch1_tok_s": round(batch1, 2),
            f"n{args.samples}_tok_s": round(samples, 2), "seeded_alone_equals_batched": alone == batched,
            "first_differing_token": first_difference,
            "gemm_dispatch": "off" if llm.engine.layercast else "profiled per shape at start-up"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random weights of this shape (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the best is kept")
    parser.add_argument("--out", default=None, help="JSON path (default: a new file in benchmarks/results/)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but no CUDA GPU is visible; run on a GPU or use --device cpu")
    bf16 = measure(args, None)
    fp32 = measure(args, "float32")
    ratio1 = fp32["batch1_tok_s"] / bf16["batch1_tok_s"]
    ration = fp32[f"n{args.samples}_tok_s"] / bf16[f"n{args.samples}_tok_s"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"{'':24}{'bf16 compute':>14}{'fp32 (LayerCast)':>18}{'ratio':>8}")
    print(f"{'batch-1 greedy tok/s':24}{bf16['batch1_tok_s']:>14}{fp32['batch1_tok_s']:>18}{ratio1:>8.2f}")
    key = f"n{args.samples}_tok_s"
    print(f"{f'n={args.samples} samples tok/s':24}{bf16[key]:>14}{fp32[key]:>18}{ration:>8.2f}")
    print(f"{'seeded alone == batched':24}{str(bf16['seeded_alone_equals_batched']):>14}"
          f"{str(fp32['seeded_alone_equals_batched']):>18}")
    result = {"bf16": bf16, "layercast": fp32, "ratio_batch1": round(ratio1, 3), "ratio_samples": round(ration, 3),
              "model": args.shape or args.model, "device": device, "new_tokens": args.new_tokens,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "command": "python benchmarks/compute_dtype.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")}
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"compute_dtype_{args.device.split(':')[0]}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
