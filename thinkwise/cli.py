"""Command line: `thinkwise generate ...`, `solve ...`, `bench ...` and `serve ...`.

Parses arguments, builds the engine through the same `LLM` API users call, and prints
completions (or JSON with token counts). Mistakes a user can make end with a one-line
`error:` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from thinkwise.errors import ThinkwiseError


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default', a Hugging Face model directory, or a .gguf file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="bfloat16 (default), float16 or float32")
    parser.add_argument("--compute-dtype", default=None,
                        help="dtype of activations, attention and the KV cache (default: --dtype); float32 with "
                             "16-bit weights is LayerCast: reproducible whatever is batched, slower")
    parser.add_argument("--kv-blocks", type=int, default=None, help="number of KV cache blocks")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences batched at once")
    parser.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + output tokens")


def _engine_options(args: argparse.Namespace) -> dict:
    return dict(
        device=args.device, dtype=args.dtype, compute_dtype=args.compute_dtype, num_kv_blocks=args.kv_blocks, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkwise", description="thinkwise inference engine")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete a prompt")
    _add_engine_arguments(gen)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--n", type=int, default=1, help="samples sharing one prefill")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print outputs with token counts as JSON")
    gen.add_argument("prompt", help="the prompt text ('-' reads standard input)")

    solve = commands.add_parser("solve", help="answer a question with a test-time strategy")
    _add_engine_arguments(solve)
    solve.add_argument("--strategy", default="majority@k",
                       help="greedy, majority@k, short-m@k, best-of-n, weighted-best-of-n, adaptive:N, budget:N")
    solve.add_argument("--k", type=int, default=8, help="samples (k)")
    solve.add_argument("--m", type=int, default=None, help="short-m@k: vote among the first m to finish")
    solve.add_argument("--budget", type=int, default=None, help="budget: thinking tokens")
    solve.add_argument("--max-tokens", type=int, default=512)
    solve.add_argument("--temperature", type=float, default=0.7)
    solve.add_argument("--top-p", type=float, default=0.95)
    solve.add_argument("--seed", type=int, default=None)
    solve.add_argument("--extract", default="auto", help="auto, last_number, boxed, answer_line, choice, code")
    solve.add_argument("--answer", default=None, help="reference answer: enables best-of-n with an exact checker")
    solve.add_argument("--raw", action="store_true", help="do not wrap the question in the chat template")
    solve.add_argument("--json", action="store_true", help="print the whole Answer as JSON")
    solve.add_argument("--backend", choices=["local", "openai"], default="local",
                       help="local: this process's engine; openai: any OpenAI-compatible server (--base-url)")
    solve.add_argument("--base-url", default=None, help="with --backend openai: e.g. http://host:8000/v1")
    solve.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                       help="with --backend openai (default: $OPENAI_API_KEY)")
    solve.add_argument("question", help="the question ('-' reads standard input)")

    bench = commands.add_parser(
        "bench", help="accuracy vs cost of strategies on verifiable tasks",
        description="Runs every strategy on the same generated problems and writes results.jsonl, summary.csv, "
                    "paired_tests.csv, report.html and accuracy-vs-cost PNGs. CPU-sized example: --tasks sum:2,"
                    "median:2 --strategies greedy,majority@4 --n-per-level 5 --max-tokens 160.")
    _add_engine_arguments(bench)
    bench.add_argument("--tasks", default="sum:2-4,hanoi:3-4",
                       help="families and levels: NAME:LOW-HIGH, NAME:A/B/C or NAME (its default levels), comma-"
                            "separated, e.g. hanoi:3-6,sum:2-5; jsonl:PATH for your own problems (default: %(default)s)")
    bench.add_argument("--strategies", default="greedy,majority@8,short-1@8,short-3@8,adaptive:16,budget:512",
                       help="comma-separated strategy names (default: %(default)s)")
    bench.add_argument("--n-per-level", type=int, default=20,
                       help="distinct problems per family and level (fewer where a level has fewer; default: %(default)s)")
    bench.add_argument("--prompt-style", choices=["cot", "direct"], default="cot",
                       help="cot: reason step by step, then the answer line; direct: the answer line only (default: %(default)s)")
    bench.add_argument("--max-tokens", type=int, default=None,
                       help="decode limit per sample (default: each family's limit for its level and the style)")
    bench.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: %(default)s)")
    bench.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: %(default)s)")
    bench.add_argument("--seed", type=int, default=0, help="draws the problems and every problem's sampling seed (default: %(default)s)")
    bench.add_argument("--seeds", type=int, default=1,
                       help="repeat the sampled strategies with this many sampling seeds and report the spread (default: %(default)s)")
    bench.add_argument("--dry-run", action="store_true", help="print the plan and its estimate, run nothing")
    bench.add_argument("--out", required=True,
                       help="directory for the results and report; a rerun resumes what is missing")

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    serve.add_argument("--api-key", default=os.environ.get("THINKWISE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 (default: $THINKWISE_API_KEY, else none)")
    serve.add_argument("--served-model-name", action="append", default=None,
                       help="name clients use as 'model' (repeatable; default: the model's name and --model)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="CUDA: share of free memory for the KV cache (instead of --kv-blocks)")
    serve.add_argument("--max-n", type=int, default=16, help="most samples (n) per prompt")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="sequences that may wait beyond --max-num-seqs; past that, requests get 429")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from thinkwise import LLM, SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
    )
    llm = LLM(args.model, progress=True, **_engine_options(args))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        output = llm.chat(messages, params)[0]
    else:
        output = llm.generate(prompt, params)[0]
    if args.json:
        print(json.dumps(output.to_dict(), indent=2))
        return 0
    for completion in output.outputs:
        if len(output.outputs) > 1:
            print(f"--- sample {completion.index} ({completion.finish_reason}) ---")
        print(completion.text)
    return 0


def _solve(args: argparse.Namespace) -> int:
    from thinkwise import LLM, SamplingParams
    from thinkwise.strategies import parse_strategy

    question = sys.stdin.read() if args.question == "-" else args.question
    parse_strategy(args.strategy, k=args.k, m=args.m, budget=args.budget)  # fail fast, before loading
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    verifier = None
    if args.answer is not None:
        from thinkwise.tasks.verifiers import ExactChecker

        verifier = ExactChecker(args.answer)
    if args.backend == "openai":
        from thinkwise.errors import InvalidParameterError
        from thinkwise.strategies.remote import RemoteBackend, solve_remote

        if not args.base_url:
            raise InvalidParameterError("--backend openai needs --base-url (e.g. http://host:8000/v1)",
                                        param="base_url")
        # --model names the model on the remote server.
        backend = RemoteBackend(args.base_url, model=args.model, api_key=args.api_key)
        answer = solve_remote(backend, question, args.strategy, k=args.k, m=args.m, sampling_params=params,
                              extract=args.extract, verifier=verifier)
    else:
        llm = LLM(args.model, progress=True, **_engine_options(args))
        answer = llm.solve(question, args.strategy, k=args.k, m=args.m, budget=args.budget, sampling_params=params,
                           extract=args.extract, verifier=verifier, use_chat_template=not args.raw)
    if args.json:
        print(json.dumps(answer.to_dict(), indent=2))
        return 0
    cost = answer.cost
    print(f"answer: {answer.answer}")
    print("votes: " + (", ".join(f"{a!r}: {v:g}" for a, v in sorted(answer.votes.items(), key=lambda x: -x[1])) or "none"))
    finished = sum(1 for s in answer.samples if s.finish_reason == "stop")
    print(f"samples: {len(answer.samples)} ({finished} finished, {cost.aborted_samples} aborted)")
    print(f"cost: {cost.prompt_tokens_computed} prompt tokens computed, {cost.prompt_tokens_cached} cached, "
          f"{cost.decode_tokens} decoded, {cost.forced_tokens} forced, {cost.wall_time_s:.1f} s")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from thinkwise import LLM
    from thinkwise.errors import InvalidParameterError
    from thinkwise.server import ServerSettings, run_server

    options = _engine_options(args)
    if args.gpu_memory_utilization is not None:
        if args.kv_blocks is not None:
            raise InvalidParameterError("give --kv-blocks or --gpu-memory-utilization, not both",
                                        param="gpu_memory_utilization")
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    for name in ("max_n", "max_body_mb"):
        if getattr(args, name) <= 0:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be > 0", param=name)
    if args.max_queue < 0:
        raise InvalidParameterError("--max-queue must be >= 0", param="max_queue")
    llm = LLM(args.model, progress=True, **options)
    names = args.served_model_name
    if not names:
        names = list(dict.fromkeys([llm.engine.model_name, args.model]))
    settings = ServerSettings(served_model_names=names, api_key=args.api_key or None, max_n=args.max_n,
                              max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    run_server(llm, settings, host=args.host, port=args.port, log_level=args.log_level,
               access_log=not args.no_access_log)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from thinkwise import LLM, SamplingParams
    from thinkwise.bench import plan_benchmark, run_benchmark
    from thinkwise.errors import InvalidParameterError

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if args.n_per_level < 1:
        raise InvalidParameterError("--n-per-level must be >= 1", param="n_per_level")
    params = SamplingParams(max_tokens=args.max_tokens or 512, temperature=args.temperature, top_p=args.top_p)
    # Everything that can be checked and counted is, before the model loads.
    planned = plan_benchmark(args.tasks, strategies, args.out, n_per_level=args.n_per_level, seed=args.seed,
                             params=params, seeds=args.seeds, prompt_style=args.prompt_style,
                             max_tokens=args.max_tokens)
    print(planned.estimate(args.seeds), file=sys.stderr)
    bound = planned.plan.token_bound
    if bound > 50_000 and args.device in (None, "cpu"):
        # A 2-core CPU decodes the 0.5B default model at roughly 10-50 tokens/s over a full
        # batch (docs/bench_default_cpu.md); every sample running to its limit bounds the time.
        print(f"warning: a long run on a CPU: up to {bound / 50 / 60:,.0f}-{bound / 10 / 60:,.0f} minutes at 10-50 "
              "decode tokens/s; the README's CPU-sized example takes minutes", file=sys.stderr)
    if args.dry_run:
        return 0
    # The CPU GEMM dispatch table changes bf16 rounding; a rerun into the same --out reuses the
    # first run's table so its samples, and so its accuracy, are reproduced exactly.
    table_path = Path(args.out) / "gemm_dispatch.json"
    options = _engine_options(args)
    if table_path.exists():
        options["cpu_gemm_table"] = json.loads(table_path.read_text())
    llm = LLM(args.model, progress=True, **options)
    table = llm.engine.run_metadata.get("gemm_dispatch", {}).get("blas_from_rows")
    if table is not None and not table_path.exists():
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(json.dumps(table, indent=2))
    bar = tqdm(total=planned.plan.runs, unit="problem", desc="bench", file=sys.stderr, dynamic_ncols=True)

    def progress(strategy: str, replicate: int) -> None:
        bar.set_postfix_str(strategy + (f" seed {replicate}" if args.seeds > 1 else ""))
        bar.update(1)

    summary = run_benchmark(llm, args.tasks, strategies, args.out, n_per_level=args.n_per_level, seed=args.seed,
                            params=params, command="thinkwise " + " ".join(sys.argv[1:]), progress=progress,
                            seeds=args.seeds, prompt_style=args.prompt_style, max_tokens=args.max_tokens,
                            planned=planned)
    bar.close()
    from thinkwise.bench.report import console_table

    print(console_table(summary))
    print(f"wrote {args.out}/results.jsonl, summary.csv, paired_tests.csv, report.html and accuracy_*.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "solve":
            return _solve(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "bench":
            return _bench(args)
    except ThinkwiseError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
