"""Every code block and command in the README, checked as written.

The README is a newcomer's first contact; an example that does not run costs them more
than a missing one. Each fenced block is extracted verbatim and every block must be
claimed by a check here, so a new block without one fails `test_every_block_is_checked`:
- bash lines are classified by their command: `thinkwise ...` is parsed by the real
  argument parser and passes the checks that run before a model loads (strategies, task
  families), and the ones that need the default model run verbatim (`slow`), except those
  in PARSE_ONLY (hours long, or needing a remote server); `python benchmarks/X.py` for a
  GPU script runs verbatim with no GPU visible and must end in the one-line "needs a CUDA
  GPU" message after parsing its arguments, a CPU script's arguments are parsed by its own
  `build_parser()`; `make X` must be a Makefile target.
- python blocks are compiled, and run verbatim in README order in one namespace against a
  `thinkwise serve` started with the README's own command (`slow`).
Commands quoted inline (`python benchmarks/...`, `thinkwise ...`) and every script's usage
lines get the same command checks; the families paragraph and the CPU speed table are
checked against the task registry and the committed benchmark file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Commands checked by parsing only, and why they are not run.
PARSE_ONLY = {
    "thinkwise bench": "the README's full bench is hours on a CPU",
    "--backend openai": "needs a remote OpenAI-compatible server (gpu-box)",
}
# python blocks, by their first line: the name a check knows them by.
PYTHON_BLOCKS = {
    "from thinkwise import LLM, SamplingParams": "use",
    "from openai import OpenAI": "client",
    "answer = llm.solve(": "solve",
    'reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "17 * 23?"}],':
        "strategy through the server",
    "out = llm.chat(": "reasoning outputs",
    "thought = client.chat.completions.create(": "thinking controls through the server",
    "for chunk in client.chat.completions.create(": "live strategy stream",
}


def code_blocks() -> list[tuple[str, str, int]]:
    """(language, text, line number) of every fenced block."""
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if match:
            start = i
            i += 1
            body = []
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((match[1], "\n".join(body), start + 1))
        i += 1
    return blocks


def bash_commands(text: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def inline_commands() -> list[str]:
    """Commands quoted inline in the prose (outside fenced blocks)."""
    prose = re.sub(r"```.*?```", "", README.read_text(), flags=re.S)
    return [c for c in re.findall(r"`([^`\n]+)`", prose) if re.match(r"(python benchmarks/|thinkwise |make )", c)]


def script_usage_commands() -> list[str]:
    """The usage lines in every benchmark script's docstring: how it is documented to run."""
    commands = []
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        for line in script.read_text().splitlines():
            match = re.match(r"\s+(python benchmarks/\S+\.py.*)$", line)
            if match:
                # Drop trailing comments and [optional] brackets: the bare documented command.
                bare = re.sub(r"\s*\[.*$", "", match[1])
                commands.append(shlex.join(shlex.split(bare, comments=True)))
    return commands


def command_kind(command: str) -> str:
    words = shlex.split(command)
    if words[0] == "export" and len(words) == 2 and re.fullmatch(r"[A-Z_]+=\S*", words[1]):
        return "env"  # applied to the README's server in test_python_blocks_run_verbatim_...
    if words[0] == "thinkwise":
        return "thinkwise"
    if words[0] == "make":
        return "make"
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        return "gpu benchmark" if Path(words[1]).name.startswith("gpu_") else "cpu benchmark"
    raise AssertionError(f"README command {command!r} has no check; add one to tests/test_readme.py")


def readme_environment() -> dict[str, str]:
    """The variables the README's bash blocks export (e.g. the server's API key)."""
    pairs = [shlex.split(c)[1].split("=", 1) for c in all_commands() if command_kind(c) == "env"]
    return dict(pairs)


def python_block_name(text: str) -> str:
    first = text.strip().splitlines()[0]
    for prefix, name in PYTHON_BLOCKS.items():
        if first.startswith(prefix):
            return name
    raise AssertionError(f"README python block starting {first!r} has no check; add it to PYTHON_BLOCKS in "
                         "tests/test_readme.py")


def all_commands() -> list[str]:
    commands = [c for lang, text, _ in code_blocks() if lang == "bash" for c in bash_commands(text)]
    return commands + inline_commands()


# ---------------------------------------------------------------------- every block claimed
def test_every_block_is_checked():
    blocks = code_blocks()
    assert len(blocks) >= 8, "the README lost its examples, or the extractor broke"
    for lang, text, line in blocks:
        assert lang in ("bash", "python"), f"README.md:{line}: a ```{lang} block has no check in tests/test_readme.py"
        if lang == "bash":
            assert bash_commands(text), f"README.md:{line}: empty bash block"
            for command in bash_commands(text):
                command_kind(command)
        else:
            python_block_name(text)


def test_python_blocks_compile():
    for lang, text, line in code_blocks():
        if lang == "python":
            compile(text, f"README.md:{line}", "exec")


# ---------------------------------------------------------------------- thinkwise commands
def _thinkwise_commands() -> list[list[str]]:
    return [shlex.split(c)[1:] for c in all_commands() if command_kind(c) == "thinkwise"]


def test_thinkwise_commands_parse_and_pass_the_checks_before_loading():
    from thinkwise.cli import build_parser
    from thinkwise.cli_checks import check_strategy, check_task_spec

    commands = _thinkwise_commands()
    assert any(c[0] == "bench" for c in commands) and any(c[0] == "solve" for c in commands)
    for args in commands:
        if "--help" in args or "--version" in args:
            continue
        parsed = build_parser().parse_args(args)  # exits (fails the test) on any argument it does not know
        if parsed.command == "solve":
            check_strategy(parsed.strategy, k=parsed.k, m=parsed.m, budget=parsed.budget)
        if parsed.command == "bench":
            check_task_spec(parsed.tasks)
            for name in parsed.strategies.split(","):
                check_strategy(name)


def test_help_and_version_commands_run_verbatim():
    from thinkwise import __version__

    ran = 0
    for args in _thinkwise_commands():
        if "--help" in args or "--version" in args:
            result = subprocess.run([sys.executable, "-m", "thinkwise", *args], capture_output=True, text=True,
                                    timeout=120)
            expected = "default:" if "--help" in args else f"thinkwise {__version__}"
            assert result.returncode == 0 and expected in result.stdout, result.stderr
            ran += 1
    assert ran >= 2


@pytest.mark.slow
def test_default_model_commands_run_verbatim(tmp_path):
    ran = 0
    for args in _thinkwise_commands():
        command = "thinkwise " + shlex.join(args)
        if "--help" in args or "--version" in args or args[0] == "serve" or any(k in command for k in PARSE_ONLY):
            continue  # serve runs in test_python_blocks_run_verbatim_against_the_readme_server
        result = subprocess.run([sys.executable, "-m", "thinkwise", *args], capture_output=True, text=True,
                                timeout=900, cwd=tmp_path)
        assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
        assert result.stdout.strip(), command
        if "--json" in args:
            assert len(result.stdout.strip().splitlines()) == 1
            json.loads(result.stdout)
        ran += 1
    assert ran >= 2


# ---------------------------------------------------------------------- benchmark scripts
def _benchmark_commands() -> list[str]:
    return [c for c in all_commands() + script_usage_commands() if command_kind(c).endswith("benchmark")]


def test_every_benchmark_script_is_documented():
    documented = {shlex.split(c)[1] for c in script_usage_commands()}
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        if script.name in ("__init__.py", "common.py"):
            continue
        assert f"benchmarks/{script.name}" in documented, f"{script.name} has no `python benchmarks/...` usage line"


def test_gpu_benchmarks_parse_their_documented_arguments_and_stop_in_one_line_without_a_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)  # `python benchmarks/X.py` from the repository, as documented
    commands = sorted({c for c in _benchmark_commands() if command_kind(c) == "gpu benchmark"})
    assert any("gpu_throughput.py" in c for c in commands)
    for command in commands:
        result = subprocess.run([sys.executable, *shlex.split(command)[1:]], capture_output=True, text=True,
                                timeout=300, cwd=REPO, env=env)
        assert result.returncode == 1, f"{command}: {result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr and "CUDA GPU" in result.stderr, f"{command}: {result.stderr[-2000:]}"
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def test_cpu_benchmarks_parse_their_documented_arguments():
    commands = sorted({c for c in _benchmark_commands() if command_kind(c) == "cpu benchmark"})
    assert any("cpu_generate.py" in c for c in commands)
    for command in commands:
        words = shlex.split(command)
        script = REPO / words[1]
        assert script.is_file(), command
        module = _load_script(script)
        if hasattr(module, "build_parser"):
            module.build_parser().parse_args(words[2:])
        else:  # a script without build_parser(): at least its --help must run from the repository
            result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                    timeout=120, cwd=REPO)
            assert result.returncode == 0, result.stderr


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    for command in all_commands():
        if command_kind(command) == "make":
            assert shlex.split(command)[1] in targets, command


# ---------------------------------------------------------------------- names, counts, links
def test_families_paragraph_matches_the_registry():
    from thinkwise.tasks import FAMILIES

    text = README.read_text()
    match = re.search(r"has (\d+) verifiable families(.*?)JSONL loader", text, flags=re.S)
    assert match, "the README's task families paragraph moved; update this test"
    families = {n for n in FAMILIES if n != "jsonl"}
    assert int(match[1]) == len(families)
    named = set(re.findall(r"`([a-z]+)`", match[2]))
    assert named == families, f"README names {sorted(named ^ families)} differently from the registry"


def test_local_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
        if not target.startswith("http"):
            assert (REPO / target).exists(), target


def test_cpu_speed_table_matches_its_results_file():
    text = README.read_text()
    section = text[text.index("## Speed"):]
    files = re.findall(r"`(benchmarks/results/cpu_generate[^`]*\.json)`", section)
    assert files, "the CPU table must name its results file"
    report = json.loads((REPO / files[0]).read_text())
    tokens = int(re.search(r"(\d+) forced new tokens", section)[1])
    module = _load_script(REPO / "benchmarks" / "cpu_generate.py")
    assert tokens == report["new_tokens"] == module.build_parser().get_default("new_tokens")
    versions = report["run"]["versions"]
    header = re.search(r"\| \| thinkwise (\S+) \| transformers (\S+) \| ratio \|", section)
    assert header and header[1] == versions["thinkwise"] and header[2] == versions["transformers"]
    assert f"torch {versions['torch']}" in section
    rows = re.findall(r"\| (batch-1 greedy decode|n=\d+ samples of one prompt) \| ([\d.]+) tok/s \| ([\d.]+) tok/s "
                      r"\| ([\d.]+)x \|", section)
    assert len(rows) == 2
    k = report["samples"]
    for (label, ours, theirs, ratio), key in zip(rows, ["batch1", f"n{k}"]):
        results = report["results"]
        assert float(ours) == pytest.approx(results[f"thinkwise_{key}"]["tokens_per_s"], abs=0.051)
        assert float(theirs) == pytest.approx(results[f"transformers_{key}"]["tokens_per_s"], abs=0.051)
        assert float(ratio) == pytest.approx(report[f"ratio_{key}"], abs=0.0051)


# ---------------------------------------------------------------------- python blocks, run
RUNNER = """
import sys
blocks = {blocks!r}
namespace = {{"__name__": "__readme__"}}
for name, text in blocks:
    print("running README block:", name, flush=True)
    exec(compile(text, "README:" + name, "exec"), namespace)
"""


@pytest.mark.slow
def test_python_blocks_run_verbatim_against_the_readme_server(tmp_path):
    """The README's python blocks in order, in one namespace, with the README's serve command running."""
    from thinkwise.cli_checks import check_listen_address
    from thinkwise.errors import InvalidParameterError

    serve = next(c for c in _thinkwise_commands() if c[0] == "serve")
    port = int(serve[serve.index("--port") + 1])
    try:
        check_listen_address("127.0.0.1", port)
    except InvalidParameterError:
        pytest.skip(f"port {port} of the README's serve command is taken on this machine")
    blocks = [(python_block_name(text), text) for lang, text, _ in code_blocks() if lang == "python"]
    server = subprocess.Popen([sys.executable, "-m", "thinkwise", *serve], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env={**os.environ, **readme_environment()})
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the README's serve command did not come up"
            time.sleep(1)
        script = tmp_path / "readme_blocks.py"
        script.write_text(RUNNER.format(blocks=blocks))
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1800,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert result.stdout.count("running README block:") == len(blocks)
    finally:
        server.terminate()
        server.wait(timeout=60)
