"""thinkwise's strategies against a real OpenAI-compatible server: reported vs counted tokens.

For each strategy it reads the server's Prometheus counters (`/metrics`) before and after
the run, and prints side by side what thinkwise charged (the streams' usage, the
default) and what the server's own counters say it computed. Rows:
- `majority@4`, `short-1@4`, `short-2@4`, `adaptive:8`: the default remote backend (one
  n=1 request per sample, hashed seeds, finished streams read to their usage);
- `majority@4 n=k`: one request with n=4 (`per_sample_requests=False`), where vLLM
  reports the prompt once but prefills it per sample;
- `short-1@4 counters`: the same strategy with `server_counters=True` (thinkwise charges
  the counter deltas itself, and says so in `cost_basis`).
Run it only against a server nobody else is using: counters see every client.

    python benchmarks/remote_vllm.py --url http://127.0.0.1:8765/v1 --model qwen-coder-0.5b

`convert` turns the default GGUF into a Hugging Face directory vLLM can serve (run it
with the vLLM environment's python: it needs only transformers, gguf and accelerate):

    /work/vllm-venv/bin/python benchmarks/remote_vllm.py convert model.gguf out_dir
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QUESTION = "What is 17 * 23? Work it out step by step, then end with the final number."


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> Hugging Face directory (dequantized to float32; vLLM's GGUF loader is a plugin now)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype="float32",
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    # Dequantized weights are plain tensors; drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


async def run_row(url: str, model: str, strategy: str, params, **options) -> dict:
    import httpx

    from thinkwise.strategies.remote import RemoteBackend, solve_remote_async
    from thinkwise.strategies.remote_counters import CounterWindow, metrics_url

    async with httpx.AsyncClient(timeout=60) as scraper:
        window = CounterWindow(scraper, metrics_url(url), settle_timeout_s=30)
        await window.start()
        backend = RemoteBackend(url, model=model, **options)
        start = time.perf_counter()
        try:
            answer = await solve_remote_async(backend, QUESTION, strategy, sampling_params=params)
        finally:
            await backend.aclose()
        wall = time.perf_counter() - start
        delta = await window.stop()
    cost = answer.cost
    return {"strategy": strategy, "options": options, "answer": answer.answer, "votes": answer.votes,
            "samples": len(answer.samples), "aborted": cost.aborted_samples,
            "finish_reasons": [s.finish_reason for s in answer.samples],
            "thinkwise_prompt_tokens": cost.prompt_tokens, "thinkwise_decode_tokens": cost.decode_tokens,
            "server_prompt_tokens": delta.prompt_tokens, "server_generation_tokens": delta.generation_tokens,
            "server_cached_prompt_tokens": delta.cached_prompt_tokens, "server_settled": delta.settled,
            "counters": delta.names, "cost_basis": answer.cost_basis, "wall_s": round(wall, 2)}


def ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else "-"


async def bench(args) -> list[dict]:
    from thinkwise.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=args.seed)
    plan = [("majority@4", {}), ("short-1@4", {}), ("short-2@4", {}), ("adaptive:8", {}),
            ("majority@4", {"per_sample_requests": False}), ("short-1@4", {"server_counters": True})]
    rows = []
    print(f"{'strategy':<28}{'prompt tw':>10}{'server':>8}{'ratio':>7}{'decode tw':>11}{'server':>8}{'ratio':>7}"
          f"{'aborted':>9}{'wall s':>8}")
    for strategy, options in plan:
        row = await run_row(args.url, args.model, strategy, params, **options)
        rows.append(row)
        label = strategy + {"per_sample_requests": " n=k", "server_counters": " counters"}.get(next(iter(options), ""), "")
        print(f"{label:<28}{row['thinkwise_prompt_tokens']:>10}{row['server_prompt_tokens']:>8}"
              f"{ratio(row['thinkwise_prompt_tokens'], row['server_prompt_tokens']):>7}"
              f"{row['thinkwise_decode_tokens']:>11}{row['server_generation_tokens']:>8}"
              f"{ratio(row['thinkwise_decode_tokens'], row['server_generation_tokens']):>7}"
              f"{row['aborted']:>9}{row['wall_s']:>8}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        if len(argv) != 3:
            print("usage: remote_vllm.py convert MODEL.gguf OUT_DIR", file=sys.stderr)
            return 2
        convert(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the model name the server serves")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server", default="vLLM", help="a label for the results file")
    parser.add_argument("--out", type=Path, default=RESULTS / "remote_vllm_cpu.json")
    args = parser.parse_args(argv)
    rows = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"server": args.server, "url": args.url, "model": args.model,
                                    "max_tokens": args.max_tokens, "seed": args.seed, "question": QUESTION,
                                    "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
