"""Serving overhead: C concurrent streaming clients on `thinkwise serve` vs the same engine offline.

Both sides run the same closed loop: C requests in flight, each finished request
replaced by the next until N are done, every request the same prompt length and
forced to its full output length (EOS ignored), seeded sampling, one logprob per
token (so every token is visible in the stream and counted). Offline drives
`Engine.step()` in this process; online, C asyncio clients stream from a
`thinkwise serve` subprocess over loopback with a minimal HTTP/1.1 client (so the
measured cost is the server's, not an HTTP library's). Reported side by side:
requests/s, output tokens/s, time to first token and inter-token latency
percentiles, and the ratio server/offline. Writes a new JSON file
(benchmarks/results/serve_load_<model>-<UTC time>.json unless --out) with the command, the
machine and the library versions.

    python benchmarks/serve_load.py --tiny                       # tiny random Llama (seconds)
    python benchmarks/serve_load.py --model default --requests 64 --max-tokens 32
    python benchmarks/serve_load.py --tiny --concurrency 1,16,64

Note: on a 2-core machine the clients share the CPU with the server, and the offline
loop has the whole machine; the ratio is therefore a pessimistic bound on the overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/X.py`: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import thinkwise  # noqa: F401  (thread settings before torch)

from benchmarks.common import add_output_arguments, output_path, write_result

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RequestTiming:
    sent: float
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50_ms": at(0.5) * 1e3, "p90_ms": at(0.9) * 1e3, "p99_ms": at(0.99) * 1e3,
            "mean_ms": statistics.fmean(ordered) * 1e3}


def summarize(timings: list[RequestTiming], wall: float, max_tokens: int) -> dict:
    tokens = sum(len(t.token_times) for t in timings)
    assert tokens == len(timings) * max_tokens, (tokens, len(timings), max_tokens)
    return {
        "requests": len(timings), "wall_s": wall, "requests_per_s": len(timings) / wall,
        "output_tokens_per_s": tokens / wall,
        "ttft": percentiles([t.ttft for t in timings]),
        "itl": percentiles([g for t in timings for g in t.gaps]),
    }


def _median_run(results: list[dict]) -> dict:
    """The run with the median throughput (its latencies come with it)."""
    return sorted(results, key=lambda r: r["requests_per_s"])[len(results) // 2]


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    high = min(vocab, 30000) - 1
    return [[rng.randint(3, high) for _ in range(length)] for _ in range(count)]


# ---------------------------------------------------------------------- offline
def run_offline(llm, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    from thinkwise import SamplingParams

    engine = llm.engine
    queue = list(enumerate(prompts))
    timings: dict[str, RequestTiming] = {}
    done: list[RequestTiming] = []

    def add_next() -> None:
        index, ids = queue.pop(0)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0, seed=index, logprobs=0)
        request = engine.add_request(None, params, prompt_token_ids=ids)
        timings[request.request_id] = RequestTiming(time.monotonic())

    start = time.monotonic()
    for _ in range(min(concurrency, len(queue))):
        add_next()
    while timings:
        result = engine.step()
        now = time.monotonic()
        for event in result.events:
            timings[event.request_id].token_times.extend([now] * len(event.token_ids))
        for output in result.finished:
            done.append(timings.pop(output.request_id))
            if queue:
                add_next()
    return summarize(done, time.monotonic() - start, max_tokens)


# ---------------------------------------------------------------------- online
class StreamClient:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads a chunked SSE response."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: dict, timing: RequestTiming) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        timing.sent = time.monotonic()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        reader = self.reader
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"server answered {status!r}")
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        if not chunked:
            raise RuntimeError("expected a chunked streaming response")
        buffer = b""
        finished = False
        while True:
            size = int((await reader.readline()).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            buffer += data[:-2]
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event == b"data: [DONE]":
                    finished = True
                    continue
                chunk = json.loads(event[6:])
                now = time.monotonic()
                for choice in chunk["choices"]:
                    logprobs = choice.get("logprobs")
                    if logprobs:
                        timing.token_times.extend([now] * len(logprobs["tokens"]))
        if not finished:
            raise RuntimeError("stream ended without [DONE]")

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _run_clients(host: str, port: int, model: str, prompts: list[list[int]], max_tokens: int,
                       concurrency: int, server_pid: int) -> dict:
    queue = list(enumerate(prompts))
    done: list[RequestTiming] = []

    async def client() -> None:
        connection = StreamClient(host, port)
        try:
            while queue:
                index, ids = queue.pop(0)
                timing = RequestTiming(0.0)
                body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                        "temperature": 1.0, "seed": index, "logprobs": 0}
                await connection.post_stream("/v1/completions", body, timing)
                done.append(timing)
        finally:
            await connection.close()

    start, cpu_start = time.monotonic(), time.process_time()
    server_cpu_start = _process_cpu_seconds(server_pid)
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(queue)))))
    wall = time.monotonic() - start
    result = summarize(done, wall, max_tokens)
    # On a small machine the clients compete with the server for the same cores.
    result["client_cpu_share"] = (time.process_time() - cpu_start) / wall
    result["server_cpu_share"] = (_process_cpu_seconds(server_pid) - server_cpu_start) / wall
    return result


def _process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _healthy(host: str, port: int) -> bool:
    import http.client

    try:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False


def start_server(model: str, engine_args: list[str], log_path: Path) -> tuple[subprocess.Popen, str, int]:
    command = [sys.executable, "-m", "thinkwise", "serve", "--model", model, "--port", "0", "--served-model-name",
               "bench", "--no-access-log", "--log-level", "warning", *engine_args]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log.close()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()}")
        match = re.search(r"listening on http://([\d.]+):(\d+)", log_path.read_text(errors="replace"))
        if match and _healthy(match.group(1), int(match.group(2))):
            return process, match.group(1), int(match.group(2))
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model reference (ignored with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="build and use a tiny random Llama (tests' fixture)")
    parser.add_argument("--concurrency", default="64", help="concurrent clients; a comma list runs each")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default: 4 x concurrency)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--kv-blocks", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="alternating offline/server runs; the median is shown")
    add_output_arguments(parser, "serve_load_<model>")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="serve_load_"))
    model = args.model
    name = "default" if model == "default" else Path(model).name
    if args.tiny:
        name = "tiny-llama"  # as the tiny model's directory is named below
    out = output_path(args, f"serve_load_{name}")
    if args.tiny:
        sys.path.insert(0, str(REPO))
        from tests.tiny_models import make_tiny_model

        model = str(workdir / "tiny-llama")
        make_tiny_model("llama", Path(model), seed=1)
        name = "tiny-llama"
    max_seqs = max(levels)
    options = dict(dtype=args.dtype or ("float32" if args.tiny else None), device=args.device,
                   num_kv_blocks=args.kv_blocks, max_num_seqs=max(max_seqs, 1))
    cli = ["--max-num-seqs", str(max(max_seqs, 1))]
    for flag, value in (("--dtype", options["dtype"]), ("--device", args.device), ("--kv-blocks", args.kv_blocks)):
        if value is not None:
            cli += [flag, str(value)]

    from thinkwise import LLM

    print(f"model {name}: loading for the offline runs ...", flush=True)
    llm = LLM(model, progress=False, **{k: v for k, v in options.items() if v is not None})
    vocab = llm.engine.model_config.vocab_size
    warm = make_prompts(2, args.prompt_tokens, vocab, seed=99)
    run_offline(llm, warm, 4, 2)
    print("starting thinkwise serve ...", flush=True)
    process, host, port = start_server(model, cli, workdir / "serve.log")
    runs: dict[int, dict] = {}
    try:
        asyncio.run(_run_clients(host, port, "bench", warm, 4, 2, process.pid))
        for level in levels:
            count = args.requests or 4 * level
            trials: dict[str, list[dict]] = {"offline": [], "server": []}
            # Alternate the two sides so that drifts of a shared machine hit both alike; fresh
            # prompts each repeat so that the prefix cache never serves a later repeat.
            for repeat in range(args.repeats):
                prompts = make_prompts(count, args.prompt_tokens, vocab, seed=1000 * repeat + level)
                trials["offline"].append(run_offline(llm, prompts, args.max_tokens, level))
                trials["server"].append(asyncio.run(_run_clients(host, port, "bench", prompts, args.max_tokens, level,
                                                                 process.pid)))
                print(f"  c={level} repeat {repeat}: offline {trials['offline'][-1]['requests_per_s']:.2f} req/s, "
                      f"server {trials['server'][-1]['requests_per_s']:.2f} req/s", flush=True)
            runs[level] = {side: _median_run(results) for side, results in trials.items()}
            runs[level]["all_requests_per_s"] = {side: [r["requests_per_s"] for r in results]
                                                 for side, results in trials.items()}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    run_metadata = llm.engine.run_metadata

    print()
    print(f"{name}: prompt {args.prompt_tokens} tokens, {args.max_tokens} output tokens per request, "
          f"closed loop, logprobs=0, {platform.machine()} x{os.cpu_count()} threads, median of {args.repeats} runs")
    header = f"{'concurrency':>11} {'metric':<22} {'offline':>10} {'server':>10} {'server/offline':>15}"
    print(header)
    print("-" * len(header))
    for level, run in runs.items():
        off, srv = run["offline"], run["server"]
        rows = [("requests/s", off["requests_per_s"], srv["requests_per_s"]),
                ("output tokens/s", off["output_tokens_per_s"], srv["output_tokens_per_s"])]
        for metric in ("ttft", "itl"):
            for q in ("p50_ms", "p90_ms", "p99_ms"):
                rows.append((f"{metric.upper()} {q.replace('_ms', '')} (ms)", off[metric][q], srv[metric][q]))
        for label, a, b in rows:
            print(f"{level:>11} {label:<22} {a:>10.2f} {b:>10.2f} {b / a:>15.3f}")
        run["throughput_ratio"] = srv["requests_per_s"] / off["requests_per_s"]
        run["throughput_loss_pct"] = 100 * (1 - run["throughput_ratio"])
        print(f"{level:>11} {'throughput loss':<22} {'':>10} {'':>10} {run['throughput_loss_pct']:>14.1f}%")
        print(f"{level:>11} {'CPU cores used':<22} {'':>10} {'':>10}   server {srv['server_cpu_share']:.2f}, "
              f"clients {srv['client_cpu_share']:.2f}")
        every = run["all_requests_per_s"]
        print(f"{level:>11} {'all runs (req/s)':<22} offline {', '.join(f'{x:.1f}' for x in every['offline'])}; "
              f"server {', '.join(f'{x:.1f}' for x in every['server'])}")
    print()
    write_result(out, {
        "model": name, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "engine_options": options,
        "repeats": args.repeats, "thinkwise_run_metadata": run_metadata,
        "runs": {str(k): v for k, v in runs.items()},
    })


if __name__ == "__main__":
    main()
