"""Command line: `thinkwise generate ...`, `solve ...`, `bench ...` and `serve ...`.

Parses arguments, checks every one it can before a model loads (`cli_checks`), builds
the engine through the same `LLM` API users call, streams text as it is produced
(`cli_live`) and prints results. stdout carries only results (text, answers, JSON);
progress, live views and logs go to stderr. Mistakes a user can make end with a
one-line `error:` message naming the fix and exit status 2, never a traceback; Ctrl-C
prints what was generated so far and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from thinkwise.cli_checks import DTYPE_CHOICES
from thinkwise.errors import ThinkwiseError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help, except empty ones and secrets (keys from the environment)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        empty = action.default is None or action.default is False or action.default == []
        if empty or "api_key" in action.dest or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Never break inside a word: a default such as a strategy list must stay copyable.
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that name the fix, and "did you mean" for flags and commands."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        from thinkwise.cli_checks import did_you_mean

        if "invalid choice:" in message and "(choose from" in message:
            given = message.split("invalid choice: ")[1].split(" (choose")[0].strip("'")
            choices = [c.strip(" '") for c in message.split("(choose from ")[1].rstrip(")").split(",")]
            message = message + did_you_mean(given, choices)
        elif message.startswith("the following arguments are required"):
            message += " (see " + self.prog + " --help)"
        else:
            message += f" (see {self.prog} --help)"
        self.exit(2, f"error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        from thinkwise.cli_checks import did_you_mean

        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            sub = _subparsers(self).get(command) if command else None
            options = [o for a in (sub or self)._actions for o in a.option_strings]
            flag = next((e for e in extras if e.startswith("-")), extras[0])
            hint = did_you_mean(flag.split("=")[0], options) if flag.startswith("-") else ""
            prog = sub.prog if sub is not None else self.prog
            self.exit(2, f"error: unrecognized argument {flag!r}{hint} (see {prog} --help)\n")
        return parsed


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _bench_epilog() -> str:
    """Task families and what their level means, from the task registry."""
    from thinkwise.tasks import FAMILIES

    lines = ["task families (--tasks NAME:LEVELS; LEVELS is 3, 2-5 or 2/4/8; NAME alone uses its defaults):"]
    for name, family in sorted(FAMILIES.items()):
        if name == "jsonl":
            continue
        defaults = "/".join(str(x) for x in family.default_levels)
        lines.append(f"  {name:<9} levels {family.min_level}-{family.max_level}, default {defaults}: "
                     f"{family.description}")
    lines.append("  jsonl:PATH  your own problems, one JSON object per line")
    lines.append(_strategies_epilog("--strategies, comma-separated"))
    return "\n".join(lines)


def _strategies_epilog(where: str) -> str:
    """Every registered strategy with its options (from the strategy registry)."""
    from thinkwise.strategies import strategy_help

    return (f"strategies ({where}; options as NAME(key=value, ...), e.g. deepconf@16(eta=10)):\n"
            + strategy_help(verbose=True))


def _add_strategy_options(parser: argparse.ArgumentParser) -> None:
    """One --flag per strategy parameter in the registry (k, m and budget have their own)."""
    from thinkwise.strategies import option_params

    group = parser.add_argument_group("strategy options (each applies to the strategies that take it)")
    for param in option_params():
        choices = f" ({'|'.join(param.choices)})" if param.choices else ""
        group.add_argument("--" + param.name.replace("_", "-"), dest="strategy_" + param.name, default=None,
                           metavar=param.name.upper(), help=f"{param.help}{choices}".replace("%", "%%"))


def _strategy_options(args: argparse.Namespace) -> dict:
    return {key[len("strategy_"):]: value for key, value in vars(args).items()
            if key.startswith("strategy_") and value is not None}


def _strategy_names() -> str:
    from thinkwise.strategies import STRATEGY_HELP

    return STRATEGY_HELP


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default", help="'default', a Hugging Face model directory, or a .gguf file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, metavar="DTYPE",
                        help="bfloat16 (default), float16 or float32")
    parser.add_argument("--compute-dtype", default=None, choices=DTYPE_CHOICES, metavar="DTYPE",
                        help="dtype of activations, attention and the KV cache (default: --dtype); float32 with "
                             "16-bit weights is LayerCast: reproducible whatever is batched, slower")
    parser.add_argument("--quantization", default=None, metavar="METHOD",
                        help="weights quantized on load: int8 (per channel), int4 (MLP in groups of 32, attention "
                             "int8; -g64/-g128 for wider groups, int4-all for attention too), gguf (a GGUF's own "
                             "bit widths); default: the 16-bit weights")
    parser.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE",
                        help="KV cache storage: auto (the compute dtype, default) or fp8 (= fp8_e4m3: 8-bit codes "
                             "with a scale per token and KV head, about twice the tokens in the same memory; CUDA "
                             "needs compute capability 8.9+)")
    parser.add_argument("--kv-blocks", type=int, default=None, help="number of KV cache blocks (default: sized to memory)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences batched at once")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="cap on prompt + output tokens (default: the model's context)")
    parser.add_argument("--reasoning-parser", default="auto", choices=["auto", "deepseek_r1", "qwen3", "none"],
                        help="how outputs split thinking from the answer (reasoning_content); auto: from the chat "
                             "template and tokenizer")
    parser.add_argument("--thinking-budget-message", default=None,
                        help="text forced before </think> when a thinking budget runs out")
    parser.add_argument("--reasoning-effort-budgets", default=None, metavar="low=N,medium=N,high=N",
                        help="thinking budget each reasoning_effort means (default low=512,medium=2048,high=8192; "
                             "'none' for unlimited)")


def _engine_options(args: argparse.Namespace) -> dict:
    return dict(
        device=args.device, dtype=args.dtype, compute_dtype=args.compute_dtype, num_kv_blocks=args.kv_blocks,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        reasoning_parser=args.reasoning_parser, thinking_budget_message=args.thinking_budget_message,
        **_effort_budgets(args.reasoning_effort_budgets),
    )


def _effort_budgets(text: str | None) -> dict:
    """--reasoning-effort-budgets low=N,medium=N,high=N as EngineConfig.reasoning_effort_budgets."""
    from thinkwise.errors import InvalidParameterError

    if text is None:
        return {}
    budgets: dict = {"low": 512, "medium": 2048, "high": 8192}
    for part in text.split(","):
        effort, _, value = part.partition("=")
        effort, value = effort.strip(), value.strip()
        if effort not in budgets or not (value.isdigit() or value == "none"):
            raise InvalidParameterError(f"--reasoning-effort-budgets: {part!r} is not EFFORT=N with EFFORT one of low, "
                                        "medium, high and N a token count or 'none'", param="reasoning_effort_budgets")
        budgets[effort] = None if value == "none" else int(value)
    return {"reasoning_effort_budgets": budgets}


def build_parser() -> argparse.ArgumentParser:
    from thinkwise import __version__

    parser = _Parser(prog="thinkwise", description="thinkwise: an LLM inference engine for reasoning models")
    parser.add_argument("--version", action="version", version=f"thinkwise {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser("generate", help="complete a prompt (streams the text)",
                              description="Complete a prompt; text streams to stdout as it is produced.")
    _add_engine_arguments(gen)
    gen.add_argument("--max-tokens", type=int, default=256, help="most new tokens per sample")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens of this mass")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this share of the top one")
    gen.add_argument("--n", type=int, default=1, help="samples sharing one prefill (labelled [i] when streamed)")
    gen.add_argument("--seed", type=int, default=None, help="seed: the same seed gives the same tokens")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]: penalize generated tokens once")
    gen.add_argument("--frequency-penalty", type=float, default=0.0,
                     help="in [-2, 2]: penalize generated tokens by their count")
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="> 0: divide (multiply) positive (negative) logits of prompt and generated tokens")
    gen.add_argument("--thinking-budget", type=int, default=None,
                     help="most thinking tokens before </think> is forced")
    gen.add_argument("--reasoning-effort", default=None, choices=["low", "medium", "high"],
                     help="a thinking budget from --reasoning-effort-budgets (instead of --thinking-budget)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the chat template")
    gen.add_argument("--chat-template-kwargs", default=None,
                     help='JSON object of chat template variables (with --chat), e.g. \'{"enable_thinking": false}\'')
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print outputs with token counts as one line of JSON")
    gen.add_argument("--no-stream", action="store_true", help="print the text once it is complete (for scripts)")
    gen.add_argument("prompt", help="the prompt text ('-' reads standard input)")

    solve = commands.add_parser("solve", help="answer a question with a test-time strategy",
                                description="Answer a question with a test-time strategy; the samples stream to "
                                            "stderr with a live status line, the answer goes to stdout.",
                                epilog=_strategies_epilog("--strategy"))
    _add_engine_arguments(solve)
    solve.add_argument("--strategy", default="majority@k", help=_strategy_names())
    solve.add_argument("--k", type=int, default=8, help="samples (k)")
    solve.add_argument("--m", type=int, default=None, help="short-m@k: vote among the first m to finish")
    solve.add_argument("--budget", type=int, default=None, help="budget: thinking tokens")
    solve.add_argument("--max-tokens", type=int, default=512, help="most new tokens per sample")
    solve.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    solve.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the top tokens of this mass")
    solve.add_argument("--seed", type=int, default=None, help="seed: the same seed gives the same samples")
    solve.add_argument("--extract", default="auto", help="how a sample's answer is read: auto, last_number, boxed, "
                                                         "answer_line, choice, code")
    solve.add_argument("--answer", default=None, help="reference answer: enables best-of-n with an exact checker")
    solve.add_argument("--raw", action="store_true", help="do not wrap the question in the chat template")
    solve.add_argument("--json", action="store_true", help="print the whole Answer as one line of JSON")
    solve.add_argument("--no-stream", action="store_true",
                       help="do not show the samples' text on stderr (the status line stays on a terminal)")
    solve.add_argument("--backend", choices=["local", "openai"], default="local",
                       help="local: this process's engine; openai: any OpenAI-compatible server (--base-url)")
    solve.add_argument("--base-url", default=None, help="with --backend openai: e.g. http://host:8000/v1")
    solve.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                       help="with --backend openai (default: $OPENAI_API_KEY)")
    solve.add_argument("question", help="the question ('-' reads standard input)")
    _add_strategy_options(solve)

    bench = commands.add_parser(
        "bench", help="accuracy vs cost of strategies on verifiable tasks",
        description="Runs every strategy on the same generated problems and writes results.jsonl, summary.csv, "
                    "paired_tests.csv, report.html and accuracy-vs-cost PNGs. CPU-sized example: --tasks sum:1,"
                    "median:1 --strategies greedy,majority@4 --n-per-level 5.",
        epilog=_bench_epilog())
    _add_engine_arguments(bench)
    bench.add_argument("--tasks", default="sum:2-4,hanoi:3-4",
                       help="families and levels: NAME:LOW-HIGH, NAME:A/B/C or NAME (its default levels), comma-"
                            "separated, e.g. hanoi:3-6,sum:2-5; jsonl:PATH for your own problems")
    bench.add_argument("--strategies", default="greedy,majority@8,short-1@8,short-3@8,adaptive:16,budget:512",
                       help="comma-separated strategy names")
    bench.add_argument("--n-per-level", type=int, default=20,
                       help="distinct problems per family and level (fewer where a level has fewer)")
    bench.add_argument("--prompt-style", choices=["cot", "direct"], default="cot",
                       help="cot: reason step by step, then the answer line; direct: the answer line only")
    bench.add_argument("--max-tokens", type=int, default=None,
                       help="decode limit per sample (default: each family's limit for its level and the style)")
    bench.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    bench.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: keep the top tokens of this mass")
    bench.add_argument("--seed", type=int, default=0, help="draws the problems and every problem's sampling seed")
    bench.add_argument("--seeds", type=int, default=1,
                       help="repeat the sampled strategies with this many sampling seeds and report the spread")
    bench.add_argument("--dry-run", action="store_true", help="print the plan and its estimate, run nothing")
    bench.add_argument("--out", required=True,
                       help="directory for the results and report; a rerun resumes what is missing")

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    serve.add_argument("--api-key", default=os.environ.get("THINKWISE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1 and the docs (default: $THINKWISE_API_KEY, "
                            "else none; prefer the variable or --api-key-file: a command line is visible to every "
                            "local process)")
    serve.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    serve.add_argument("--open-docs", action="store_true",
                       help="with an API key, still serve /docs, /redoc and /openapi.json without it")
    serve.add_argument("--timeout-keep-alive", type=float, default=5.0,
                       help="seconds an idle keep-alive connection stays open")
    serve.add_argument("--timeout-request-read", type=float, default=30.0,
                       help="seconds a client has to send a request's headers, and then its body")
    serve.add_argument("--served-model-name", action="append", default=None,
                       help="name clients use as 'model' (repeatable; default: the model's name and --model)")
    serve.add_argument("--gpu-memory-utilization", type=float, default=None,
                       help="CUDA: share of free memory for the KV cache (instead of --kv-blocks)")
    serve.add_argument("--max-n", type=int, default=16, help="most samples (n) per prompt")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="sequences that may wait beyond --max-num-seqs; past that, requests get 429")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="server log level")
    serve.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    return parser


def _check_local_model(args: argparse.Namespace, options: dict) -> None:
    """What can be checked before the weights load: device, engine options, --max-tokens
    against the model's context (read from its configuration alone)."""
    from thinkwise.cli_checks import check_device, check_engine_options, check_max_tokens, model_context_length

    check_device(args.device)
    check_engine_options(options)
    check_max_tokens(args.max_tokens, model_context_length(args.model), args.max_model_len)


def _print_json(data) -> None:
    # One line: valid for `jq` and JSON-lines consumers, and no token id on a line of its own.
    print(json.dumps(data, separators=(",", ":"), default=str))


def _generate(args: argparse.Namespace) -> int:
    from thinkwise import LLM, SamplingParams
    from thinkwise.cli_live import TextStream

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = SamplingParams(
        n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, thinking_budget=args.thinking_budget,
    )
    template_kwargs = _template_kwargs(args.chat_template_kwargs)
    options = _engine_options(args)
    if args.reasoning_effort is not None:
        from dataclasses import replace

        from thinkwise.engine.config import EngineConfig
        from thinkwise.errors import InvalidParameterError

        if args.thinking_budget is not None:
            raise InvalidParameterError("give --thinking-budget or --reasoning-effort, not both",
                                        param="reasoning_effort")
        budget = EngineConfig(**options).reasoning_effort_budgets[args.reasoning_effort]
        params = replace(params, thinking_budget=budget)
    _check_local_model(args, options)
    llm = LLM(args.model, progress=True, **options)
    stream = TextStream(args.n, stops=args.stop, enabled=not (args.no_stream or args.json))
    try:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            messages.append({"role": "user", "content": prompt})
            output = llm.chat(messages, params, on_events=stream.on_events, chat_template_kwargs=template_kwargs)[0]
        else:
            output = llm.generate(prompt, params, on_events=stream.on_events)[0]
    except KeyboardInterrupt:
        if stream.enabled:
            stream.interrupted()
        elif args.json:
            _print_json({"interrupted": True, "outputs": [
                {"index": i, "text": stream.texts[i], "finish_reason": stream.finish_reasons[i]}
                for i in range(args.n)]})
        else:
            _print_samples([(i, stream.texts[i], stream.finish_reasons[i] or "interrupted") for i in range(args.n)])
        raise
    if args.json:
        _print_json(output.to_dict())
    elif not stream.enabled:
        _print_samples([(c.index, c.text, c.finish_reason) for c in output.outputs])
    return 0


def _template_kwargs(text: str | None) -> dict | None:
    """--chat-template-kwargs: a JSON object, checked as the server checks the request field."""
    from thinkwise.errors import InvalidParameterError

    if text is None:
        return None
    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("it must be a JSON object")
        from thinkwise.server.protocol import check_template_kwargs

        return check_template_kwargs(value)
    except ValueError as error:
        raise InvalidParameterError(f"--chat-template-kwargs {text[:60]!r} is not usable: {error}; give a JSON "
                                    'object such as \'{"enable_thinking": false}\'', param="chat_template_kwargs") from None


def _print_samples(samples: list[tuple[int, str, str | None]]) -> None:
    for index, text, reason in samples:
        if len(samples) > 1:
            print(f"--- sample {index} ({reason}) ---")
        print(text)


def _solve(args: argparse.Namespace) -> int:
    from thinkwise import SamplingParams
    from thinkwise.cli_checks import check_strategy
    from thinkwise.cli_live import StrategyView
    from thinkwise.errors import InvalidParameterError

    question = sys.stdin.read() if args.question == "-" else args.question
    spec = check_strategy(args.strategy, k=args.k, m=args.m, budget=args.budget,
                          **_strategy_options(args))  # before loading
    if spec.definition.needs_verifier and args.answer is None:
        raise InvalidParameterError(f"{args.strategy} needs a checker: pass --answer REFERENCE (samples are checked "
                                    "against it), or use majority@k, which needs none", param="answer")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    verifier = None
    if args.answer is not None:
        from thinkwise.tasks.verifiers import ExactChecker

        verifier = ExactChecker(args.answer)
    view = StrategyView(args.extract, stream=not args.no_stream)
    try:
        answer = _run_solve(args, question, spec, params, verifier, view)
    except KeyboardInterrupt:
        view.close()
        _print_partial_strategy(view, args.json)
        raise
    view.close()
    if args.json:
        _print_json(answer.to_dict())
        return 0
    cost = answer.cost
    print(f"answer: {answer.answer}")
    print("votes: " + (", ".join(f"{a!r}: {v:g}" for a, v in sorted(answer.votes.items(), key=lambda x: -x[1])) or "none"))
    finished = sum(1 for s in answer.samples if s.finish_reason == "stop")
    print(f"samples: {len(answer.samples)} ({finished} finished, {cost.aborted_samples} aborted)")
    print(f"cost: {cost.prompt_tokens_computed} prompt tokens computed, {cost.prompt_tokens_cached} cached, "
          f"{cost.decode_tokens} decoded, {cost.forced_tokens} forced, {cost.wall_time_s:.1f} s")
    return 0


def _run_solve(args: argparse.Namespace, question: str, spec, params, verifier, view):
    from thinkwise.errors import InvalidParameterError

    if args.backend == "openai":
        from thinkwise.strategies.remote import RemoteBackend, solve_remote

        if not args.base_url:
            raise InvalidParameterError("--backend openai needs --base-url (e.g. http://host:8000/v1)",
                                        param="base_url")
        # --model names the model on the remote server.
        backend = RemoteBackend(args.base_url, model=args.model, api_key=args.api_key)
        return solve_remote(view.watch(backend), question, args.strategy, k=args.k, m=args.m,
                            sampling_params=params, extract=args.extract, verifier=verifier,
                            options=_strategy_options(args))
    from thinkwise import LLM
    from thinkwise.llm import StrategyJob

    options = _engine_options(args)
    _check_local_model(args, options)
    llm = LLM(args.model, progress=True, **options)
    job = StrategyJob(question, spec, params, args.extract, verifier, use_chat_template=not args.raw)
    return llm.run_strategy_jobs([job], backend_wrapper=view.watch)[0]


def _print_partial_strategy(view, as_json: bool) -> None:
    """Ctrl-C during a strategy: every sample's text so far and the votes it had."""
    rows = view.samples()
    if as_json:
        _print_json({"interrupted": True, "status": view.status(rows), "samples": [
            {k: v for k, v in row.items() if k != "key"} for row in rows]})
        return
    print("interrupted; samples so far:")
    _print_samples([(r["index"], r["text"], r["finish_reason"] or "running") for r in rows])
    print(view.status(rows))


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
    api_key = _serve_api_key(args)
    for name in ("max_n", "max_body_mb", "timeout_keep_alive", "timeout_request_read"):
        if not getattr(args, name) > 0 or getattr(args, name) == float("inf"):
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be a positive finite number", param=name)
    if args.max_queue < 0:
        raise InvalidParameterError("--max-queue must be >= 0", param="max_queue")
    _check_serve(args, options)
    llm = LLM(args.model, progress=True, **options)
    names = args.served_model_name
    if not names:
        names = list(dict.fromkeys([llm.engine.model_name, args.model]))
    settings = ServerSettings(served_model_names=names, api_key=api_key, max_n=args.max_n,
                              max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                              open_docs=args.open_docs, timeout_keep_alive=args.timeout_keep_alive,
                              timeout_request_read=args.timeout_request_read)
    run_server(llm, settings, host=args.host, port=args.port, log_level=args.log_level,
               access_log=not args.no_access_log)
    return 0


def _serve_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, else --api-key / $THINKWISE_API_KEY, else None (no key)."""
    from thinkwise.errors import InvalidParameterError

    if args.api_key_file is None:
        return args.api_key or None
    try:
        lines = open(args.api_key_file, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidParameterError(f"--api-key-file {args.api_key_file!r} cannot be read: {error}",
                                    param="api_key_file") from None
    key = lines[0].strip() if lines else ""
    if not key or any(ord(c) < 33 or ord(c) > 126 for c in key):
        raise InvalidParameterError(f"--api-key-file {args.api_key_file!r} must hold the key on its first line "
                                    "(printable ASCII, no spaces)", param="api_key_file")
    return key


def _check_serve(args: argparse.Namespace, options: dict) -> None:
    from thinkwise.cli_checks import check_device, check_engine_options, check_listen_address

    check_listen_address(args.host, args.port)
    check_device(args.device)
    check_engine_options(options)


def _check_bench(args: argparse.Namespace, strategies: list[str]) -> None:
    """Everything a bench run can get wrong, before the model loads."""
    from thinkwise.cli_checks import check_strategy, check_task_spec
    from thinkwise.errors import InvalidParameterError

    if not strategies:
        raise InvalidParameterError("--strategies is empty; e.g. --strategies greedy,majority@8", param="strategies")
    for name in strategies:
        check_strategy(name)
    check_task_spec(args.tasks)
    if args.n_per_level < 1:
        raise InvalidParameterError("--n-per-level must be >= 1", param="n_per_level")


def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from thinkwise import LLM, SamplingParams
    from thinkwise.bench import plan_benchmark, run_benchmark
    from thinkwise.errors import InvalidParameterError

    from thinkwise.strategies import split_strategies

    strategies = split_strategies(args.strategies)
    # Everything that can be checked and counted is, before the model loads.
    if args.seeds < 1:
        raise InvalidParameterError(f"--seeds must be >= 1, got {args.seeds}", param="seeds")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InvalidParameterError(f"--max-tokens must be >= 1, got {args.max_tokens}", param="max_tokens")
    _check_bench(args, strategies)
    params = SamplingParams(max_tokens=args.max_tokens or 512, temperature=args.temperature, top_p=args.top_p)
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
        return 0  # needs no model: the plan is all it prints
    # The model (device, context) against the longest per-sample limit the plan uses.
    longest = max(planned.plan.max_tokens.values(), default=params.max_tokens)
    _check_local_model(argparse.Namespace(**{**vars(args), "max_tokens": longest}), _engine_options(args))
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
    commands = {"generate": _generate, "solve": _solve, "serve": _serve, "bench": _bench}
    try:
        return commands[args.command](args)
    except ThinkwiseError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `thinkwise generate ... | head`: the reader left; that is not an error
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
