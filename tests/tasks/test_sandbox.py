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
from thinkwise.tasks.sandbox import CodeTestVerifier, SandboxUnavailableError, code_from_completion

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
    return cwd == "/sandbox" or "thinkwise-unsafe-" in cwd or b"thinkwise-" in environ


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


# Every sandbox test runs with the audit layer on (the default) and off, where the kernel
# sandbox (bubblewrap, seccomp, rlimits) stands alone.
MODES = [True, False]


@pytest.fixture(params=MODES, ids=lambda audit: "audit+kernel" if audit else "kernel-only")
def mode(request):
    return request.param


@pytest.fixture()
def verifier(mode):
    return CodeTestVerifier(ADD_TESTS, timeout_s=2, audit_hook=mode)


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


# ----------------------------------------------------------------------------- audit layer: refusals named
# (containment itself, seen from outside, is tested in tests/security/)


def outside_path() -> str:
    """A path on our filesystem that the sandbox cannot see (/var is not bound in)."""
    return f"/var/tmp/pwned_{secrets.token_hex(8)}"


WRITE_ATTEMPTS = {
    "open": "open({path!r}, 'w').write('x')",
    "os.open": "import os\nos.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "pathlib": "import pathlib\npathlib.Path({path!r}).write_text('x')",
    "shutil.copy": "import shutil\nopen('f', 'w').write('x')\nshutil.copy('f', {path!r})",
    "symlink": "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')",
    "mkfifo": "import os\nos.mkfifo({path!r})",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {path}'])",
    "os.system": "import os\nos.system('echo x > {path}')",
    "sqlite": "import sqlite3\nsqlite3.connect({path!r}).execute('create table t (x)')",
}


@pytest.mark.parametrize("how", sorted(WRITE_ATTEMPTS))
def test_writing_outside_is_refused_by_the_audit_layer_and_stopped_by_the_kernel(mode, how):
    path = outside_path()
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=2, audit_hook=mode)
    result = verifier.run(WRITE_ATTEMPTS[how].format(path=path) + "\ndef add(a, b):\n    return a + b\n")
    assert not os.path.lexists(path)
    assert result.outcome != "passed" or not mode
    if mode:
        assert result.outcome == "refused" and result.score == 0.0, (result.detail, result.stderr)


def test_a_sibling_of_the_run_directory_counts_as_outside_it(mode):
    """`<rundir>-escaped` shares the run directory's name as a prefix: the audit layer must still
    refuse it (its check compares whole path components), and the kernel keeps it off the host."""
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=2, audit_hook=mode)
    result = verifier.run("import os\nopen(os.getcwd() + '-escaped', 'w').write('x')\n"
                          "def add(a, b):\n    return a + b\n")
    assert not os.path.lexists("/sandbox-escaped")
    assert result.outcome != "passed"
    if mode:
        assert result.outcome == "refused" and result.score == 0.0, (result.detail, result.stderr)


def test_tmp_is_private_to_the_run(verifier):
    # /tmp inside is the run's own tmpfs: writable, never our /tmp, gone afterwards.
    name = f"thinkwise_private_{secrets.token_hex(6)}"
    result = verifier.run(f"open('/tmp/{name}', 'w').write('x')\nopen('/dev/shm/{name}', 'w').write('y')\n"
                          "import os\nprint(sorted(os.listdir('/tmp')))\ndef add(a, b):\n    return a + b\n")
    assert result.outcome == "passed", result.detail
    assert name in result.stdout and not os.path.exists(f"/tmp/{name}") and not os.path.exists(f"/dev/shm/{name}")
    assert verifier.run(f"import os\nassert not os.path.exists('/tmp/{name}')\ndef add(a, b):\n    return a + b"
                        ).outcome == "passed"


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
    assert set(child_environment) <= {"HOME", "TMPDIR", "LC_CTYPE", "PWD"}  # LC_CTYPE: Python's locale coercion


def test_running_past_the_time_limit_is_killed_on_time(mode):
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=1, audit_hook=mode)
    started = time.monotonic()
    result = verifier.run("while True:\n    pass")
    assert result.outcome == "timeout" and result.score == 0.0
    # The loop never ends by itself, so ending at all shows the kill; the bound only has to
    # hold on a loaded 2-core machine (sandbox start-up included), not be tight.
    assert time.monotonic() - started < 1 + 20


def test_sleeping_children_holding_the_pipes_do_not_outlive_the_timeout(mode):
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=1, max_processes=2, audit_hook=mode)
    before = live_processes()
    started = time.monotonic()
    result = verifier.run("import os, time\nfor _ in range(2):\n    if os.fork() == 0:\n        time.sleep(60)\n"
                          "print('x' * 100000)\ntime.sleep(60)")
    # The children sleep 60 s holding the pipes: returning well before that shows they were killed.
    assert result.outcome == "timeout" and time.monotonic() - started < 1 + 20
    assert len(result.stdout) < 70 * 1024  # output is capped, not buffered without bound
    assert_nothing_left_behind(result, before)


FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"


def test_a_fork_bomb_is_stopped_and_leaves_nothing_behind(mode):
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=3, audit_hook=mode, max_threads=4)
    before = live_processes()
    result = verifier.run(FORK_BOMB)
    assert result.score == 0.0 and result.outcome in ("refused", "failed", "crashed")
    if mode:
        assert "os.fork" in result.detail
    else:  # RLIMIT_NPROC in the run's own user namespace
        assert "Resource temporarily unavailable" in result.detail, result.detail
    assert_nothing_left_behind(result, before)


def test_forks_beyond_the_budget_are_refused():
    verifier = CodeTestVerifier("assert True", timeout_s=3, max_processes=3)
    before = live_processes()
    # Each child tries to keep forking too: the budget is a total, not per level.
    result = verifier.run("import os, time\nn = 0\nfor _ in range(20):\n    try:\n        os.fork()\n"
                          "        n += 1\n    except PermissionError:\n        break\n"
                          "print(os.getpid(), n, flush=True)\ntime.sleep(0.3)")
    assert result.outcome == "refused" and "budget of 3" in result.detail
    reports = [int(line.split()[1]) for line in result.stdout.splitlines()]
    assert len(reports) == 4 and max(reports) == 3  # top process forked 3 times; children none
    assert_nothing_left_behind(result, before)


def test_allocating_too_much_memory_is_refused(mode):
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=3, memory_mb=128, audit_hook=mode)
    result = verifier.run("blob = bytearray(1 << 30)\ndef add(a, b):\n    return a + b\n")
    assert result.outcome == "refused" and "memory" in result.detail and result.score == 0.0
    # The limit is per run: the next sample is unaffected.
    assert verifier.run("def add(a, b):\n    return a + b").outcome == "passed"


def test_file_size_disk_and_file_count_limits(mode):
    verifier = CodeTestVerifier("assert True", timeout_s=3, max_file_mb=1, max_files=8, max_disk_mb=4,
                                audit_hook=mode)
    big = verifier.run("open('big', 'wb').write(b'x' * (4 << 20))")
    assert big.outcome == "refused" and "file_size" in big.detail
    # Many files under the size limit: the tmpfs fills (ENOSPC) long before our RAM does.
    disk = verifier.run("import os\nfor i in range(64):\n    open(f'/dev/shm/f{i}', 'wb').write(b'x' * (1 << 19))")
    assert disk.score == 0.0 and ("No space left" in disk.detail or "more than 8 files" in disk.detail)
    if mode:
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
def test_the_audit_layer_names_what_it_refuses(code, refused):
    result = CodeTestVerifier(ADD_TESTS, timeout_s=2).run(code)
    assert result.outcome == "refused" and refused in result.detail, result.detail


def test_native_code_is_unavailable_to_the_audit_layer():
    verifier = CodeTestVerifier(ADD_TESTS, timeout_s=2)
    assert "not available" in verifier.run("import ctypes").detail
    result = verifier.run("open('evil.cpython-311-x86_64-linux-gnu.so', 'wb').write(b'x')\n"
                          "import sys\nsys.path.insert(0, '.')\nimport evil")
    assert result.outcome == "refused" and "native extension" in result.detail


# ----------------------------------------------------------------------------- honest checking


ALWAYS_EQUAL = ("class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
                "    def __bool__(self):\n        return True\n")


def test_an_always_equal_object_scores_zero(mode):
    verifier = CodeTestVerifier(ADD_TESTS + ["assert add(2, 2)"], timeout_s=2, audit_hook=mode)
    result = verifier.run(ALWAYS_EQUAL + "def add(a, b):\n    return Anything()\n")
    assert result.score == 0.0 and result.outcome == "failed"
    assert all("not plain data" in t.error and "Anything" in t.error for t in result.tests), result.tests


def test_subclasses_of_builtins_are_not_plain():
    result = CodeTestVerifier(ADD_TESTS, timeout_s=2).run(
        "class Sly(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Sly(0)\n")
    assert result.score == 0.0 and "not plain data" in result.detail


def test_always_equal_inside_containers_and_test_functions_fails():
    tests = ("def test_list():\n    assert add(1, 2) == [3]\n\ndef test_dict():\n    assert {'k': add(1, 2)} == {'k': 3}\n")
    result = CodeTestVerifier(tests, timeout_s=2).run(ALWAYS_EQUAL + "def add(a, b):\n    return Anything()\n")
    assert result.score == 0.0 and all("not plain data" in t.error for t in result.tests), result.tests
    nested = CodeTestVerifier(["assert add(1, 2) == [3]"], timeout_s=2).run(
        ALWAYS_EQUAL + "def add(a, b):\n    return [Anything()]\n")
    assert nested.score == 0.0 and "not plain data" in nested.detail


def test_the_expected_value_never_enters_the_sandbox():
    secret = 982451653 * 7
    verifier = CodeTestVerifier([f"assert answer() == {secret}"], timeout_s=2)
    assert verifier.tests[0]["exprs"] == ["answer()"]
    # The candidate reads everything it can reach: the job's text, its stdin, its memory.
    result = verifier.run("import re, sys\n"
                          "seen = repr([getattr(f, 'f_locals', None) for f in [sys._getframe(i) for i in range(1, 4)]])\n"
                          "numbers = re.findall(r'\\d{10}', seen)\n"
                          "def answer():\n    return int(numbers[0]) if numbers else -1\n")
    assert result.score == 0.0


def test_plain_values_compare_as_python_does(mode):
    verifier = CodeTestVerifier(["assert f() == (1, [2.5, 'x'], {'a': None}, b'z', {3}, True)", "assert f()",
                                 "assert 2 ** 20000 + 1 == big()", "assert 'x' in f()[1]", "assert f() != 3"],
                                timeout_s=2, audit_hook=mode)
    result = verifier.run("def f():\n    return (1, [2.5, 'x'], {'a': None}, b'z', {3}, True)\n"
                          "def big():\n    return 2 ** 20000 + 1\n")
    assert result.outcome == "passed", result.tests


def test_forged_result_lines_cannot_pass_a_values_test():
    # The candidate writes "passed" claims for every index on the result pipe itself.
    code = ("import os, json, sys\n"
            "for fd in range(3, 20):\n"
            "    for i in range(3):\n"
            "        try:\n"
            "            os.write(fd, (json.dumps({'kind': 'test', 'index': i, 'passed': True, 'nonce': 'x'}) + '\\n').encode())\n"
            "        except OSError:\n            pass\n"
            "def add(a, b):\n    return 0\n")
    result = CodeTestVerifier(ADD_TESTS, timeout_s=2, audit_hook=False).run(code)
    assert result.score < 0.5


# ----------------------------------------------------------------------------- no silent weak mode


def test_without_bubblewrap_untrusted_code_is_refused(monkeypatch):
    from thinkwise.tasks import isolation

    monkeypatch.delenv(isolation.UNSAFE_ENV, raising=False)
    monkeypatch.setattr(isolation, "bwrap_path", lambda: None)
    monkeypatch.setattr(isolation, "_probe_results", {})
    marker = outside_path()
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap") as raised:
        CodeTestVerifier(ADD_TESTS, timeout_s=2).run(f"open({marker!r}, 'w').write('x')")
    assert isolation.UNSAFE_ENV in str(raised.value) and not os.path.exists(marker)


def test_the_unsafe_opt_in_is_explicit_and_loud(monkeypatch, capfd):
    from thinkwise.tasks import isolation, sandbox

    monkeypatch.setattr(isolation, "bwrap_path", lambda: None)
    monkeypatch.setattr(isolation, "_probe_results", {})
    monkeypatch.setattr(sandbox, "_warned_unsafe", False)
    monkeypatch.setenv(isolation.UNSAFE_ENV, "0")
    with pytest.raises(SandboxUnavailableError):
        CodeTestVerifier(ADD_TESTS, timeout_s=2).run("def add(a, b):\n    return a + b")
    monkeypatch.setenv(isolation.UNSAFE_ENV, "1")
    with pytest.warns(RuntimeWarning, match="WITHOUT kernel isolation"):
        result = CodeTestVerifier(ADD_TESTS, timeout_s=2).run("def add(a, b):\n    return a + b")
    assert result.outcome == "passed" and result.isolation.startswith("NONE")
    assert "WITHOUT kernel isolation" in capfd.readouterr().err


def test_a_missing_seccomp_binding_is_refused(monkeypatch):
    from thinkwise.tasks import isolation

    monkeypatch.delenv(isolation.UNSAFE_ENV, raising=False)
    monkeypatch.setattr(isolation, "_seccomp_module", lambda: None)
    monkeypatch.setattr(isolation, "_probe_results", {})
    isolation.seccomp_program.cache_clear()
    try:
        with pytest.raises(SandboxUnavailableError, match="pyseccomp"):
            CodeTestVerifier(ADD_TESTS, timeout_s=2).run("def add(a, b):\n    return a + b")
    finally:
        isolation.seccomp_program.cache_clear()


def test_runs_say_they_were_isolated(verifier):
    result = verifier.run("def add(a, b):\n    return a + b")
    assert result.isolation == "bubblewrap"
