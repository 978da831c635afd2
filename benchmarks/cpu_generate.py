"""CPU generation speed on the default model: thinkwise (16-bit and quantized) vs llama.cpp.

Every column loads the same GGUF and decodes the same chat prompt (as token ids) with
every request forced to its full length (EOS ignored) on the same number of threads, timed
the same way: batch-1 greedy decode, then n samples of one prompt decoded together
(warm-up first, which also fills each engine's prompt cache, then the best of --repeats).
Columns: thinkwise at each `--quantization` (none = the 16-bit weights; int8, int4, gguf:
see thinkwise/kernels/linear_methods), llama.cpp through the `xllamacpp` wheel (its embedded
server, n_parallel = n; `pip install thinkwise[bench]`), and optionally transformers. Each
column runs in its own child process, loaded one after another, so its load time and
resident memory (RSS before and after loading, and at the end) are its own. The timed runs
are interleaved: every column stays loaded and round r times each column once (in an order
rotated by r), so a shared machine's drift (15-20% over minutes on a 2-core VM, where the
columns once ran one after another and a ratio carried the drift between them) falls on every
column alike; `--sequential` measures one column at a time instead (one engine in memory at
a time). Prints tokens/s, the ratios to llama.cpp, and writes a JSON file
(benchmarks/results/cpu_generate-<UTC time>.json unless --out) with the command, machine,
versions and every timed run.

    python benchmarks/cpu_generate.py [--quantization none,int8,int4,gguf] [--baselines llama.cpp]
        [--new-tokens 48] [--samples 8] [--threads 2] [--repeats 3] [--sequential] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_output_arguments, output_path, write_result

QUESTION = "Explain step by step how to compute 17 * 23 without a calculator."
BASELINES = ("llama.cpp", "transformers")


def rss_mib() -> float:
    """This process's resident set size (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_thinkwise(args, quantization: str) -> tuple[dict, dict]:
    import thinkwise  # noqa: F401  (thread settings before torch)
    import torch

    from thinkwise import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    rss_before = rss_mib()
    start = time.perf_counter()
    llm = LLM("default", dtype=args.dtype, device="cpu", quantization=None if quantization == "none" else quantization)
    load_s = time.perf_counter() - start
    rss_loaded = rss_mib()
    prompt_ids = llm.apply_chat_template([{"role": "user", "content": QUESTION}])
    n_new, k = args.new_tokens, args.samples

    def batch1():
        out = llm.generate({"prompt_token_ids": prompt_ids},
                           SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == n_new

    def n_samples():
        out = llm.generate({"prompt_token_ids": prompt_ids},
                           SamplingParams(n=k, temperature=0.7, top_p=0.95, seed=0, max_tokens=n_new, ignore_eos=True))[0]
        assert sum(len(o.token_ids) for o in out.outputs) == k * n_new

    greedy = llm.generate({"prompt_token_ids": prompt_ids},
                          SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))[0].outputs[0].token_ids
    meta = llm.engine.run_metadata
    model = llm.engine.runner.model
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    weight_bytes += sum(getattr(m, "blas_weight", None).nbytes for m in model.modules()
                        if getattr(m, "blas_weight", None) is not None and m.blas_weight.base is None)
    kv_bytes = llm.engine.runner.kv_cache.numel() * llm.engine.runner.kv_cache.element_size()
    info = {"prompt_ids": prompt_ids, "greedy_ids": list(greedy), "load_s": round(load_s, 2),
            "weights_mib": round(weight_bytes / 2**20), "kv_cache_mib": round(kv_bytes / 2**20),
            "rss_mib": {"before_load": round(rss_before), "after_load": round(rss_loaded)},
            "linear_methods": {key: meta["linear_methods"].get(key)
                               for key in ("method", "counts", "notes", "cpu_kernel")},
            "gemm_dispatch": meta.get("gemm_dispatch")}
    return info, {"batch1": batch1, "n_samples": n_samples}


def load_llamacpp(args, prompt_ids: list[int]) -> tuple[dict, dict]:
    import threading

    try:
        import xllamacpp
    except ImportError:
        raise Skipped("xllamacpp is not installed: pip install 'thinkwise[bench]'") from None
    from thinkwise.loading import resolve_default_model

    params = xllamacpp.CommonParams()
    params.model.path = str(resolve_default_model())
    params.n_parallel = args.samples
    params.n_ctx = args.samples * (len(prompt_ids) + args.new_tokens + 64)
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    rss_before = rss_mib()
    start = time.perf_counter()
    server = xllamacpp.Server(params)
    load_s = time.perf_counter() - start
    rss_loaded = rss_mib()
    n_new, k = args.new_tokens, args.samples

    def complete(temperature: float, seed: int) -> list[int]:
        body = {"prompt": prompt_ids, "n_predict": n_new, "ignore_eos": True, "temperature": temperature,
                "top_p": 0.95, "seed": seed, "cache_prompt": True, "return_tokens": True}
        result = server.handle_completions(body)
        if not isinstance(result, dict) or "choices" not in result and "tokens" not in result:
            raise RuntimeError(f"llama.cpp answered {str(result)[:300]}")
        usage = result.get("usage", {})
        assert usage.get("completion_tokens", n_new) == n_new, usage
        choice = result.get("choices", [{}])[0]
        return list(choice.get("tokens") or result.get("tokens") or [])

    def batch1():
        complete(0.0, 0)

    def n_samples():
        threads = [threading.Thread(target=complete, args=(0.7, i)) for i in range(k)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    greedy = complete(0.0, 0)
    info = {"load_s": round(load_s, 2), "greedy_ids": greedy,
            "rss_mib": {"before_load": round(rss_before), "after_load": round(rss_loaded)},
            "build": dict(xllamacpp.BUILD_INFO)}
    return info, {"batch1": batch1, "n_samples": n_samples}


def load_transformers(args, prompt_ids: list[int]) -> tuple[dict, dict]:
    import thinkwise  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM

    from thinkwise.loading import resolve_default_model

    torch.set_num_threads(args.threads)
    gguf_path = resolve_default_model()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    rss_before = rss_mib()
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype).eval()
    load_s = time.perf_counter() - start
    rss_loaded = rss_mib()
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    n_new, k = args.new_tokens, args.samples

    def batch1():
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)

    def n_samples():
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True,
                        temperature=0.7, top_p=0.95, num_return_sequences=k)

    info = {"load_s": round(load_s, 2),
            "rss_mib": {"before_load": round(rss_before), "after_load": round(rss_loaded)}}
    return info, {"batch1": batch1, "n_samples": n_samples}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=48, help="forced new tokens per sample")
    parser.add_argument("--samples", type=int, default=8, help="n of the n-samples measurement")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quantization", default="none,int8,int4,gguf",
                        help="comma-separated thinkwise columns: none (16-bit), int8, int4, int4-g64, int4-g128, gguf")
    parser.add_argument("--baselines", default="llama.cpp",
                        help=f"comma-separated: {', '.join(BASELINES)} (or none)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every engine")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed rounds after a warm-up; each column's best run is kept")
    parser.add_argument("--sequential", action="store_true",
                        help="measure one column at a time, not in interleaved rounds: one engine in memory at a "
                             "time (interleaved, all stay loaded: ~2.3 GB a quantized thinkwise column on the "
                             "default model, 1 GB of it the KV cache, ~0.8 GB llama.cpp)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one column, in a child process
    parser.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    add_output_arguments(parser, "cpu_generate")
    return parser


class Skipped(Exception):
    """A column that cannot run here (its engine is not installed): reported, not a failure."""


MEASUREMENTS = ("batch1", "n_samples")


def worker(args) -> None:
    """One column in a child process: load, warm up, then time one run per line read from
    stdin ("batch1" / "n_samples"), answering each on the protocol pipe; "finish" ends it."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # an engine's own prints go to stderr, never into the protocol

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    prompt_ids = json.loads(args.prompt_ids) if args.prompt_ids else None
    try:
        if args.worker == "llama.cpp":
            info, runs = load_llamacpp(args, prompt_ids)
        elif args.worker == "transformers":
            info, runs = load_transformers(args, prompt_ids)
        else:
            info, runs = load_thinkwise(args, args.worker.removeprefix("thinkwise:"))
    except Skipped as reason:
        send({"skipped": str(reason)})
        return
    for fn in runs.values():  # warm-up (also fills the prompt cache the same way for every timed run)
        fn()
    send({"loaded": info})
    for line in sys.stdin:
        command = line.strip()
        if command == "finish":
            send({"rss_end_mib": round(rss_mib())})
            return
        send({"seconds": timed(runs[command])})


class Column:
    """The parent's handle on one worker process (see `worker`)."""

    def __init__(self, args, name: str, prompt_ids: list[int] | None):
        self.name, self.seconds = name, {m: [] for m in MEASUREMENTS}
        self.stderr = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
                   "--new-tokens", str(args.new_tokens), "--samples", str(args.samples), "--dtype", args.dtype,
                   "--threads", str(args.threads)]
        if prompt_ids is not None:
            command += ["--prompt-ids", json.dumps(prompt_ids)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.stderr, text=True, bufsize=1)
        first = self.receive()
        self.result = first.get("loaded") or first  # {"skipped": ...} or {"failed": ...}

    @property
    def live(self) -> bool:
        return "failed" not in self.result and "skipped" not in self.result

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if line:
            return json.loads(line)
        self.process.wait()
        self.stderr.seek(0)
        return {"failed": self.stderr.read()[-2000:] or f"exit status {self.process.returncode}"}

    def send(self, command: str) -> None:
        try:
            self.process.stdin.write(command + "\n")
        except OSError:  # the worker died: `receive` reports its stderr
            pass

    def time(self, measurement: str) -> None:
        self.send(measurement)
        answer = self.receive()
        if "seconds" not in answer:
            self.result = answer
            return
        self.seconds[measurement].append(answer["seconds"])

    def finish(self, args) -> dict:
        if self.live:
            self.send("finish")
            answer = self.receive()
            self.result["rss_mib"]["end"] = answer.get("rss_end_mib")
            k, n_new = args.samples, args.new_tokens
            tokens = {"batch1": n_new, "n_samples": k * n_new}
            keys = {"batch1": "batch1_tok_s", "n_samples": f"n{k}_tok_s"}
            for m in MEASUREMENTS:
                self.result[keys[m]] = round(tokens[m] / min(self.seconds[m]), 2)
                self.result[f"{keys[m]}_runs"] = [round(tokens[m] / t, 2) for t in self.seconds[m]]
        try:
            self.process.stdin.close()
        except OSError:
            pass
        self.process.wait()
        self.stderr.close()
        return self.result


def rounds(columns: list[Column], repeats: int) -> None:
    """Times every live column `repeats` times per measurement, round by round, the order
    rotated each round so no column always runs first or right after another."""
    for measurement in MEASUREMENTS:
        for r in range(repeats):
            live = [c for c in columns if c.live]
            for column in live[r % max(1, len(live)):] + live[:r % max(1, len(live))]:
                column.time(measurement)


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        worker(args)
        return
    if args.repeats < 1:
        sys.exit("error: --repeats must be at least 1")
    out = output_path(args, "cpu_generate")
    k = args.samples
    names = [f"thinkwise:{q.strip()}" for q in args.quantization.split(",") if q.strip()]
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none"]
    for name in baselines:
        if name not in BASELINES:
            sys.exit(f"error: --baselines {name!r} is not one of {', '.join(BASELINES)}")
    results: dict[str, dict] = {}
    prompt_ids = None
    loaded: list[Column] = []
    for name in names + baselines:
        column = Column(args, name, prompt_ids)
        prompt_ids = prompt_ids or column.result.get("prompt_ids")
        if args.sequential:
            rounds([column], args.repeats)
            results[name] = column.finish(args)
        else:
            loaded.append(column)
    rounds(loaded, args.repeats)
    for column in loaded:
        results[column.name] = column.finish(args)
    for name, result in results.items():
        if "failed" in result or "skipped" in result:
            print(f"{name:>20}: {result.get('skipped') or 'failed: ' + result['failed'][-400:]}")
            continue
        rss = result["rss_mib"]
        weights = f"   weights {result['weights_mib']} MiB + KV {result['kv_cache_mib']} MiB" if "weights_mib" in result else ""
        print(f"{name:>20}: batch-1 {result['batch1_tok_s']:7.2f} tok/s   n={k} {result[f'n{k}_tok_s']:7.2f} tok/s   "
              f"load {result['load_s']:6.2f} s   RSS {rss['before_load']} -> {rss['after_load']} MiB{weights}")
    ratios = {}
    reference = results.get("llama.cpp", {})
    if "batch1_tok_s" in reference:
        for name in names:
            if "batch1_tok_s" in results[name]:
                ratios[name] = {"batch1_vs_llama.cpp": round(results[name]["batch1_tok_s"] / reference["batch1_tok_s"], 3),
                                f"n{k}_vs_llama.cpp": round(results[name][f"n{k}_tok_s"] / reference[f"n{k}_tok_s"], 3)}
                print(f"{name:>20}: {ratios[name]['batch1_vs_llama.cpp']:.2f}x llama.cpp at batch 1, "
                      f"{ratios[name][f'n{k}_vs_llama.cpp']:.2f}x at n={k}")
    for result in results.values():
        result.pop("prompt_ids", None)
    write_result(out, {"model": "default (Qwen2.5-Coder-0.5B-Instruct GGUF, Q4_K_M)", "dtype": args.dtype,
                       "new_tokens": args.new_tokens, "prompt_tokens": len(prompt_ids or []), "samples": k,
                       "threads": args.threads, "timing": "sequential" if args.sequential else "interleaved rounds",
                       "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
