"""The sandboxed code-test runner: ordinary use, and each refusal tried (writes, environment,
time, forks, memory, files, escapes, native code), leaving no process behind."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest

from thinkwise.errors import InvalidParameterError
from thinkwise.tasks.sandbox import CodeTestVerifier, code_from_completion

IS_ROOT = os.geteuid() == 0
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, uid) of live (non-zombie) processes."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if not fields.get("State", "").strip().startswith("Z"):
                found[int(entry)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
    return found


def sandbox_marked(pid: int) -> bool:
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return "thinkwise-sandbox-" in cwd or b"thinkwise-sandbox-" in environ


def leftovers(before: dict, result) -> list[int]:
    """Processes a run left behind. The sandbox's own child is reaped by then, so
    anything it started is an orphan (parent pid 1); also anything still in a sandbox
    directory or owned by the run's uid. Processes other work on the machine starts
    meanwhile have parents of their own, so this does not flake with them."""
    return [pid for pid, (parent, uid) in live_processes().items()
            if (pid not in before and parent in (0, 1)) or sandbox_marked(pid)
            or (result.sandbox_uid is not None and uid == result.sandbox_uid)]


def assert_nothing_left_behind(result, before: dict) -> None:
    deadline = time.monotonic() + 2  # SIGKILLed processes take a moment to leave /proc
    while leftovers(before, result) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftovers(before, result) == []


# Every sandbox test runs as we are (root here: a fresh uid) and, as root, also with
# privileges kept, where only the audit hook and the rlimits stand (and our own
# interpreter is used, whose modules are extensions rather than built-ins).
MODES = [None, False] if IS_ROOT else [None]


@pytest.fixture(params=MODES, ids=lambda mode: "default" if mode is None else "keep-privileges")
def mode(request):
    return request.param


@pytest.fixture()
def verifier(mode):
    return CodeTestVerifier(ADD_TESTS, timeout_s=2, drop_privileges=mode)


# ----------------------------------------------------------------------------- code tests: ordinary use


def test_correct_code_passes(verifier):
    result = verifier.run("Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.")
    assert (result.outcome, result.score, result.passed, result.total) == ("passed", 1.0, 3, 3)
    assert not result.refusals


def test_wrong_code_fails_with_the_failing_assert_named(verifier):
    result = verifier.run("```python\ndef add(a, b):\n    return abs(a) + b\n```")
    assert result.outcome == "failed" and result.score == pytest.approx(2 / 3)
    failing = [t for t in result.tests if not t.passed]
    assert len(failing) == 1 and "AssertionError" in failing[0].error and "add(-1, 1) == 0" in failing[0].error


def test_code_that_raises_fails_every_test_and_output_is_captured(verifier):
    result = verifier.run("print('hello from the sample')\nraise ValueError('boom')")
    assert result.outcome == "failed" and result.score == 0.0
    assert "ValueError: boom" in result.detail and "hello from the sample" in result.stdout


def test_test_functions_source_and_partial_credit():
    tests = ("import math\n\ndef helper(x):\n    return sorted(x)\n\n"
             "def test_sorts():\n    assert my_sort([3, 1, 2]) == helper([3, 1, 2])\n\n"
             "def test_empty():\n    assert my_sort([]) == []\n\n"
             "def test_strings():\n    from solution import my_sort as s\n    assert s(['b', 'a']) == ['a', 'b']\n")
    verifier = CodeTestVerifier(tests, timeout_s=2)
    assert [t["name"] for t in verifier.tests] == ["test_sorts", "test_empty", "test_strings"]
    assert verifier.score("p", "def my_sort(x):\n    return sorted(x)") == 1.0
    assert verifier.score("p", "def my_sort(x):\n    return x") == pytest.approx(1 / 3)  # only test_empty


def test_score_many_runs_in_parallel_and_matches_one_by_one(verifier):
    samples = ["def add(a, b): return a + b", "def add(a, b): return a * b", "def add(a, b): return b + a + 0",
               "syntax error here ("]
    assert verifier.score_many("p", samples) == [verifier.score("p", s) for s in samples] == [1.0, 0.0, 1.0, 0.0]


def test_bad_tests_are_user_errors():
    for bad in ("assert (", [], ["assert x ==", "assert True"], [3], ""):
        with pytest.raises(InvalidParameterError):
            CodeTestVerifier(bad)
    with pytest.raises(InvalidParameterError, match="timeout_s"):
        CodeTestVerifier(ADD_TESTS, timeout_s=0)


def test_code_from_completion_prefers_python_blocks():
    text = "```python\nx = 1\n```\n```text\noutput\n```"
    assert code_from_completion(text) == "x = 1"
    assert code_from_completion("def f(): pass") == "def f(): pass"


def test_stdlib_code_works_inside_the_sandbox(verifier):
    # threads, asyncio (imports subprocess), tempfile (in its own dir), json, writing and
    # reading files in the working directory, signalling itself.
    code = ("import asyncio, json, os, signal, tempfile, threading, collections\n"
            "threads = [threading.Thread(target=lambda: None) for _ in range(4)]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]\n"
            "async def three():\n    return 3\nassert asyncio.run(three()) == 3\n"
            "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'x'), 'w').write('1')\n"
            "with open('data.json', 'w') as f:\n    json.dump({'a': 1}, f)\n"
            "assert json.load(open('data.json')) == {'a': 1}\n"
            "os.kill(os.getpid(), 0)\n"
            "def add(a, b):\n    return a + b\n")
    result = verifier.run(code)
    assert result.outcome == "passed", (result.detail, result.stderr)


# ----------------------------------------------------------------------------- code tests: refusals


def pwned_path() -> str:
    return f"/tmp/pwned_{secrets.token_hex(8)}"


WRITE_ATTEMPTS = {
    "open": "open({path!r}, 'w').write('x')",
    "os.open": "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "pathlib": "import pathlib\npathlib.Path({path!r}).write_text('x')",
    "shutil.copy": "import shutil\nopen('f', 'w').write('x')\nshutil.copy('f', {path!r})",
    "os.rename": "import os\nopen('f', 'w').write('x')\nos.rename('f', {path!r})",
    "symlink": "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')",
    "relative": "import os\nos.chdir('/tmp')\nopen(os.path.basename({path!r}), 'w').write('x')",
    "dir_fd": ("import os\nos.makedirs('a/b')\nfd = os.open('.', os.O_RDONLY)\nos.chdir('a/b')\n"
               "os.open('../' + os.path.basename({path!r}), os.O_WRONLY | os.O_CREAT, dir_fd=fd)"),
    "mkfifo": "import os\nos.mkfifo({path!r})",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {path}'])",
    "os.system": "import os\nos.system('echo x > {path}')",
    "sqlite": "import sqlite3\nsqlite3.connect({path!r}).execute('create table t (x)')",
}


@pytest.mark.parametrize("how", sorted(WRITE_ATTEMPTS))
def test_writing_outside_the_temp_dir_is_refused(verifier, how):
    path = pwned_path()
    result = verifier.run(WRITE_ATTEMPTS[how].format(path=path) + "\ndef add(a, b):\n    return a + b\n")
    assert result.outcome == "refused" and result.score == 0.0, (result.detail, result.stderr)
    assert not os.path.lexists(path)


@pytest.mark.skipif(not IS_ROOT, reason="the kernel layer (a fresh uid) is used only when running as root")
def test_kernel_layer_alone_stops_writes_to_files_we_own(tmp_path):
    # With the audit hook off, only the fresh uid stands between the code and our files.
    protected = tmp_path / "protected"
    protected.mkdir(mode=0o755)
    target = protected / "pwned"
    verifier = CodeTestVerifier("assert True", timeout_s=2, audit_hook=False)
    result = verifier.run(f"open({str(target)!r}, 'w').write('x')")
    assert result.sandbox_uid is not None and result.outcome == "failed"
    assert "PermissionError" in result.detail and not target.exists()


def test_the_parent_environment_is_invisible(verifier, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("THINKWISE_TEST_SECRET", secret)
    code = ("import json, os, sys\n"
            "print(json.dumps(dict(os.environ)))\n"
            "sys.stdout.flush()\n"
            "print(open('/proc/%d/environ' % os.getppid()).read())\n")
    result = verifier.run(code)
    assert secret not in result.stdout + result.stderr + result.detail
    child_environment = json.loads(result.stdout.splitlines()[0])
    assert "THINKWISE_TEST_SECRET" not in child_environment and "PATH" not in child_environment
    assert set(child_environment) <= {"HOME", "TMPDIR", "LC_CTYPE"}  # LC_CTYPE: Python's own locale coercion
    assert result.outcome == "refused" and "/environ" in result.detail


@pytest.mark.skipif(not IS_ROOT, reason="the kernel layer (a fresh uid) is used only when running as root")
def test_kernel_layer_alone_hides_the_parent_environment():
    verifier = CodeTestVerifier("assert True", timeout_s=2, audit_hook=False)
    result = verifier.run("import os\nprint(open('/proc/%d/environ' % os.getppid()).read())")
    assert result.outcome == "failed" and "PermissionError" in result.detail
    assert "PATH=" not in result.stdout


def test_running_past_the_time_limit_is_killed_on_time(mode):
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=1, drop_privileges=mode)
    started = time.monotonic()
    result = verifier.run("while True:\n    pass")
    assert result.outcome == "timeout" and result.score == 0.0
    assert time.monotonic() - started < 1 + 1.0


def test_sleeping_children_holding_the_pipes_do_not_outlive_the_timeout(mode):
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=1, max_processes=2, drop_privileges=mode)
    before = live_processes()
    started = time.monotonic()
    result = verifier.run("import os, time\nfor _ in range(2):\n    if os.fork() == 0:\n        time.sleep(60)\n"
                          "print('x' * 100000)\ntime.sleep(60)")
    assert result.outcome == "timeout" and time.monotonic() - started < 1 + 1.0
    assert len(result.stdout) < 70 * 1024  # output is capped, not buffered without bound
    assert_nothing_left_behind(result, before)


FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"


def test_a_fork_bomb_is_refused_and_leaves_nothing_behind(verifier):
    before = live_processes()
    result = verifier.run(FORK_BOMB)
    assert result.outcome == "refused" and "os.fork" in result.detail
    assert_nothing_left_behind(result, before)


def test_forks_beyond_the_budget_are_refused(mode):
    verifier = CodeTestVerifier("assert True", timeout_s=3, max_processes=3, drop_privileges=mode)
    before = live_processes()
    # Each child tries to keep forking too: the budget is a total, not per level.
    result = verifier.run("import os, time\nn = 0\nfor _ in range(20):\n    try:\n        os.fork()\n"
                          "        n += 1\n    except PermissionError:\n        break\n"
                          "print(os.getpid(), n, flush=True)\ntime.sleep(0.3)")
    assert result.outcome == "refused" and "budget of 3" in result.detail
    reports = [int(line.split()[1]) for line in result.stdout.splitlines()]
    assert len(reports) == 4 and max(reports) == 3  # top process forked 3 times; children none
    assert_nothing_left_behind(result, before)


@pytest.mark.skipif(not IS_ROOT, reason="RLIMIT_NPROC binds per run only under the fresh uid used as root")
def test_kernel_layer_alone_bounds_a_fork_bomb():
    verifier = CodeTestVerifier("assert True", timeout_s=3, audit_hook=False, max_threads=4)
    before = live_processes()
    result = verifier.run(FORK_BOMB)
    assert result.outcome in ("failed", "crashed") and "Resource temporarily unavailable" in result.detail
    assert_nothing_left_behind(result, before)


def test_allocating_too_much_memory_is_refused(mode):
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=3, memory_mb=128, drop_privileges=mode)
    result = verifier.run("blob = bytearray(1 << 30)\ndef add(a, b):\n    return a + b\n")
    assert result.outcome == "refused" and "memory" in result.detail and result.score == 0.0
    # The limit is per run: the next sample is unaffected.
    assert verifier.run("def add(a, b):\n    return a + b").outcome == "passed"


def test_file_size_and_file_count_limits(mode):
    verifier = CodeTestVerifier("assert True", timeout_s=3, max_file_mb=1, max_files=8, drop_privileges=mode)
    big = verifier.run("open('big', 'wb').write(b'x' * (4 << 20))")
    assert big.outcome == "refused" and "file_size" in big.detail
    many = verifier.run("for i in range(20):\n    open(f'f{i}', 'w').close()")
    assert many.outcome == "refused" and "more than 8 files" in many.detail


@pytest.mark.parametrize("code, refused", [
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "socket"),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGTERM)", "os.kill"),
    ("import _imp, importlib.util\n_imp.create_builtin(importlib.util.find_spec('math'))", "_imp.create_builtin"),
    ("import sys\nsys.settrace(lambda *a: None)", "sys.settrace"),
    ("import os\nos.setsid()", "os.setsid"),
    ("import os\nos.execv('/bin/sh', ['sh'])", "os.exec"),
])
def test_other_escapes_are_refused(verifier, code, refused):
    result = verifier.run(code)
    assert result.outcome == "refused" and refused in result.detail, result.detail


def test_native_code_is_unavailable(verifier):
    assert "not available" in verifier.run("import ctypes").detail
    result = verifier.run("open('evil.cpython-311-x86_64-linux-gnu.so', 'wb').write(b'x')\n"
                          "import sys\nsys.path.insert(0, '.')\nimport evil")
    assert result.outcome == "refused" and "native extension" in result.detail
