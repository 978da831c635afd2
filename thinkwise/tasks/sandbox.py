"""The sandboxed code-test runner: runs untrusted model-written code against unit tests.

`CodeTestVerifier` scores a completion by the fraction of tests its code passes. The
boundary is the kernel (`isolation.py`): each run is a bubblewrap sandbox with fresh
user/mount/pid/net/ipc/uts namespaces, a read-only Python runtime, a private size-bounded
tmpfs as the only writable place, no network, a seccomp filter, and rlimits for CPU,
memory, processes, files and open files set by the child before any candidate code runs;
output is capped here. When we run as root, bwrap itself runs under a fresh unused uid
(RLIMIT_NPROC does not bind root), and everything of that uid is killed afterwards; the
pid namespace and `--die-with-parent` end every process of a run in any case. Inside,
`sandbox_child.py` (run by path) adds the audit hook as a second layer that names what
it refuses, runs the code and the tests, and sends values back as plain data to be
compared here (`code_checks.py`), so returned objects cannot fake equality. Without
isolation available, runs are refused (`SandboxUnavailableError`) unless the loud
opt-in `THINKWISE_UNSAFE_NO_SANDBOX=1` is set. It lives in tasks/ so the code task family
can check answers with it; `thinkwise.tasks.verifiers` re-exports it for best-of-n.
"""

from __future__ import annotations

import ast
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from thinkwise.errors import InvalidParameterError
from thinkwise.tasks import isolation
from thinkwise.tasks.code_checks import split_test, verdict
from thinkwise.tasks.extraction import fenced_code_blocks
from thinkwise.tasks.isolation import SandboxUnavailableError

__all__ = ["CodeTestVerifier", "CodeTestResult", "TestCaseResult", "SandboxUnavailableError", "code_from_completion",
           "OUTCOMES"]

OUTCOMES = ("passed", "failed", "timeout", "crashed", "refused")
_PYTHON_TAGS = ("python", "py", "python3", "py3")


def _as_list(completions: Sequence[str], answers: Sequence[str | None] | None) -> list[str | None]:
    if answers is None:
        return [None] * len(completions)
    if len(answers) != len(completions):
        raise InvalidParameterError(
            f"score_many got {len(completions)} completions but {len(answers)} answers; pass one answer per "
            "completion or none", param="answers")
    return list(answers)


def code_from_completion(completion: str) -> str:
    """The program in a completion: the last python-tagged fenced block, else the last
    fenced block, else the whole text (a bare program)."""
    blocks = fenced_code_blocks(completion)
    python_blocks = [code for language, code in blocks if language in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return completion


@dataclass
class TestCaseResult:
    name: str
    passed: bool
    error: str | None = None


@dataclass
class CodeTestResult:
    """What one sandboxed run did. `outcome` is one of OUTCOMES: "refused" means the
    audit layer refused an operation (write outside the temp dir, exec, network, fork beyond
    the budget, ...; listed in `refusals`, and the score is 0.0 with `refusal_fails`) or
    a memory / file-size limit fired (listed in `limits`; the score stays the fraction
    of tests passed, as after a timeout). `denied_reads` are reads outside the allowed
    roots, which raise in the sample but do not count against it."""

    outcome: str
    score: float
    passed: int
    total: int
    tests: list[TestCaseResult] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)
    denied_reads: list[str] = field(default_factory=list)
    detail: str = ""
    stdout: str = ""
    stderr: str = ""
    returncode: int | None = None
    wall_time_s: float = 0.0
    sandbox_uid: int | None = None
    python: str = ""
    isolation: str = ""  # "bubblewrap", or says loudly that the unsafe opt-in ran it without


# Modules that hand out primitives the audit hook cannot see: foreign-function calls,
# process spawning without audit events, shared memory and dbm files written from C,
# subinterpreters (audit hooks added from Python are per interpreter), profilers, test
# helpers that poke at interpreter internals. (The kernel bounds what they could do.)
_BLOCKED_MODULES = (
    "_ctypes", "ctypes", "_cffi_backend", "cffi", "_posixshmem", "_gdbm", "_dbm", "readline", "_tkinter",
    "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels", "_interpqueues",
    "_testcapi", "_testinternalcapi", "_testmultiphase", "_testbuffer", "_testimportmultiple", "_testclinic",
    "_testsinglephase", "_xxtestfuzz", "_lsprof", "_posixsubprocess",
)
# Reads outside the standard library that ordinary stdlib code performs.
_READ_FILES = (
    "/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/etc/localtime", "/etc/mime.types",
    "/etc/os-release", "/usr/lib/os-release", "/proc/cpuinfo", "/proc/meminfo",
)
_READ_ROOTS = ("/usr/share/zoneinfo", "/sys/devices/system/cpu")
# Interpreters a fresh uid can run when ours sits in a root-only directory (pyenv in /root).
_FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python")
_CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_bytes()

_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_warned_unsafe = False


def _mapped_uid_ranges() -> list[tuple[int, int]]:
    try:
        lines = Path("/proc/self/uid_map").read_text().split("\n")
    except OSError:
        return [(0, 65536)]
    ranges = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            start, count = int(parts[0]), int(parts[2])
            ranges.append((start, start + count))
    return ranges


def _process_statuses():
    """The `Name: value` fields of every process's /proc status (processes may exit meanwhile)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        yield dict(line.split(":", 1) for line in status.split("\n") if ":" in line)


def _live_uids() -> dict[int, int]:
    """uid -> number of live (non-zombie) processes."""
    counts: dict[int, int] = {}
    for fields in _process_statuses():
        if "Uid" in fields and fields.get("State", "").split()[:1] != ["Z"]:
            uid = int(fields["Uid"].split()[0])
            counts[uid] = counts.get(uid, 0) + 1
    return counts


def _allocate_uid() -> int | None:
    """A uid no process and no account uses, reserved until `_release_uid`. One per run,
    so concurrent sandboxes cannot signal each other, share an RLIMIT_NPROC count, or
    be caught by another run's kill-everything-of-this-uid cleanup."""
    wanted = [(1_000_000_000, 2_000_000_000), (60_000, 65_534)]
    ranges = []
    for low, high in wanted:
        for start, end in _mapped_uid_ranges():
            if max(low, start) < min(high, end):
                ranges.append((max(low, start), min(high, end)))
        if ranges:
            break
    if not ranges:
        return None
    import pwd

    live = _live_uids()
    generator = secrets.SystemRandom()
    with _uid_lock:
        for _ in range(100):
            low, high = generator.choice(ranges)
            uid = generator.randrange(low, high)
            if uid in _uids_in_use or uid in live:
                continue
            try:
                pwd.getpwuid(uid)
                continue
            except KeyError:
                pass
            _uids_in_use.add(uid)
            return uid
    return None


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


_KILL_ALL_OF_MY_UID = "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass"


def _kill_uid(uid: int, python: str) -> None:
    """SIGKILL every process of `uid`: kill(-1) sent *as* that uid reaches exactly the
    processes it owns (Linux never signals the sender itself)."""
    for _ in range(5):
        if _live_uids().get(uid, 0) == 0:
            return
        subprocess.run(
            [python, "-I", "-S", "-c", _KILL_ALL_OF_MY_UID],
            user=uid, group=uid, extra_groups=[], env={}, cwd="/", stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=False,
        )
        time.sleep(0.02)


class _CappedBuffer:
    def __init__(self, limit: int):
        self.limit, self.data, self.dropped = limit, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        text = self.data.decode("utf-8", "replace")
        return text + (f"\n[... {self.dropped} more bytes not kept]" if self.dropped else "")




class CodeTestVerifier:
    """Runs the code in a completion against unit tests in a kernel sandbox.

    `tests` is a list of test snippets (each one test: asserts, calls) or one source
    string: if it defines top-level `test_*` functions each is a test and the rest of
    the source is shared setup, otherwise the whole string is one test. The candidate's
    code becomes module `solution` (tests see its names directly and may also
    `from solution import f`); each test runs in its own copy of that namespace. Score =
    fraction of tests passed, 0.0 when the audit layer had to refuse an operation (with
    `refusal_fails`); `run()` returns the full `CodeTestResult`.

    Checking: a one-assert test (`assert f(x) == 6`, `assert ok(x)`) is decided here on
    plain data sent back from the sandbox; the expected literal never enters it (see
    `code_checks`). A non-plain value (an object with its own `__eq__`) fails the test
    with that reason. Multi-statement tests and test_* functions run inside, where each
    asserted comparison checks for plain operands first; code sharing their interpreter
    could still forge their results, so prefer one-assert tests for adversarial use.

    Limits: `timeout_s` (wall clock; RLIMIT_CPU too), `memory_mb` (RLIMIT_AS),
    `max_processes` forks and `max_threads` threads (RLIMIT_NPROC, counted in the run's
    own user namespace), `max_file_mb` (RLIMIT_FSIZE), `max_open_files`, `max_disk_mb`
    (the tmpfs), `max_output_bytes` (stdout/stderr kept). The audit layer (on unless
    `audit_hook=False`) additionally refuses and reports writes outside the work dir,
    more than `max_files` files, exec, network sockets, native code, signals to others.

    `unsafe_no_sandbox=True` (or THINKWISE_UNSAFE_NO_SANDBOX=1) runs WITHOUT kernel
    isolation where bubblewrap is unavailable: only for trusted code or throwaway
    machines; `result.isolation` says which was used.
    """

    def __init__(self, tests: str | Sequence[str], *, timeout_s: float = 5.0, memory_mb: int = 256,
                 max_processes: int = 0, max_threads: int = 8, max_file_mb: int = 16, max_files: int = 64,
                 max_open_files: int = 64, max_disk_mb: int = 64, max_output_bytes: int = 64 * 1024,
                 allow_site_packages: bool = False, python: str | None = None, refusal_fails: bool = True,
                 audit_hook: bool = True, max_parallel: int | None = None, unsafe_no_sandbox: bool = False):
        self.setup, self.tests = self._parse_tests(tests)
        for name, value, low in (("timeout_s", timeout_s, 0.05), ("memory_mb", memory_mb, 64),
                                 ("max_file_mb", max_file_mb, 1), ("max_open_files", max_open_files, 16),
                                 ("max_disk_mb", max_disk_mb, 1), ("max_output_bytes", max_output_bytes, 1024)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
                raise InvalidParameterError(f"CodeTestVerifier {name} must be at least {low}, got {value!r}",
                                            param=name)
        for name, value in (("max_processes", max_processes), ("max_threads", max_threads),
                            ("max_files", max_files)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidParameterError(f"CodeTestVerifier {name} must be a non-negative integer, got {value!r}",
                                            param=name)
        if python is not None and not os.path.exists(python):
            raise InvalidParameterError(f"python interpreter {python!r} does not exist", param="python")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_processes = max_processes
        self.max_threads = max_threads
        self.max_file_mb = int(max_file_mb)
        self.max_files = max_files
        self.max_open_files = int(max_open_files)
        self.max_disk_mb = int(max_disk_mb)
        self.max_output_bytes = int(max_output_bytes)
        self.allow_site_packages = allow_site_packages
        self.python = python
        self.refusal_fails = refusal_fails
        self.audit_hook = audit_hook
        self.max_parallel = max_parallel or os.cpu_count() or 1
        self.unsafe_no_sandbox = bool(unsafe_no_sandbox)

    @staticmethod
    def _parse_tests(tests) -> tuple[str | None, list[dict]]:
        """(shared setup, tests). Each test is a dict: `name`, `kind` ("values": operands
        evaluated inside, judged here by `check`; "exec": a snippet run inside;
        "function": a test_* function of the setup), and what the child needs."""
        if isinstance(tests, str):
            try:
                tree = ast.parse(tests)
            except SyntaxError as error:
                raise InvalidParameterError(f"tests do not parse as Python: {error}", param="tests") from None
            names = [node.name for node in tree.body
                     if isinstance(node, ast.FunctionDef) and node.name.startswith("test")]
            if names:
                return tests, [{"name": name, "kind": "function"} for name in names]
            if not tree.body:
                raise InvalidParameterError("tests are empty; give assert statements or test_* functions",
                                            param="tests")
            tests = [tests]
        if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence) or not tests:
            raise InvalidParameterError("tests must be a source string or a non-empty list of test snippets",
                                        param="tests")
        parsed = []
        for index, source in enumerate(tests):
            if not isinstance(source, str) or not source.strip():
                raise InvalidParameterError(f"test {index} must be a non-empty string of Python, got {source!r}",
                                            param="tests")
            try:
                compile(source, f"<test {index}>", "exec")
            except (SyntaxError, ValueError) as error:
                raise InvalidParameterError(f"test {index} does not parse as Python: {error}", param="tests") from None
            name = source.strip().split("\n")[0][:80]
            split = split_test(source)
            if split is None:
                parsed.append({"name": name, "kind": "exec", "source": source})
            else:
                expressions, check = split
                parsed.append({"name": name, "kind": "values", "exprs": expressions, "check": check})
        return None, parsed

    # -- public API

    def score(self, prompt: str, completion: str, answer: str | None = None) -> float:
        return self.run(completion).score

    def score_many(self, prompt: str, completions: Sequence[str],
                   answers: Sequence[str | None] | None = None) -> list[float]:
        _as_list(completions, answers)
        return [result.score for result in self.run_many(completions)]

    def run_many(self, completions: Sequence[str]) -> list[CodeTestResult]:
        if len(completions) <= 1 or self.max_parallel <= 1:
            return [self.run(c) for c in completions]
        with ThreadPoolExecutor(max_workers=min(self.max_parallel, len(completions))) as pool:
            return list(pool.map(self.run, completions))

    def run(self, completion: str) -> CodeTestResult:
        """Run the code in `completion` (fenced block or bare program) against the tests.
        Raises SandboxUnavailableError where kernel isolation is missing (see the class)."""
        code = code_from_completion(completion)
        unsafe = self.unsafe_no_sandbox or isolation.unsafe_opt_in()
        as_root = os.geteuid() == 0
        python, runtime_dirs = self._runtime(as_root)
        uid = None
        try:
            if as_root:
                uid = _allocate_uid()
                if uid is None:
                    raise SandboxUnavailableError("no free uid to run the sandbox under (root runs each sandbox "
                                                  "under a fresh unused uid so process limits bind)")
            try:
                isolation.require(python, runtime_dirs, uid)
                isolated = True
            except SandboxUnavailableError:
                if not unsafe:
                    raise
                isolated = False
                _warn_unsafe()
            return self._run(code, python, runtime_dirs, uid, isolated)
        finally:
            if uid is not None:
                _release_uid(uid)

    # -- the run itself

    def _runtime(self, as_root: bool) -> tuple[str, list[str]]:
        """The interpreter to run inside and the directories it needs bound read-only. As
        root, bwrap runs under a fresh uid, which must be able to reach them."""
        if self.python is not None:
            candidates = [self.python]
        elif self.allow_site_packages:
            candidates = [sys.executable]
        else:
            candidates = [getattr(sys, "_base_executable", None) or sys.executable, sys.executable,
                          *_FALLBACK_PYTHONS]
        for candidate in dict.fromkeys(candidates):
            if not os.path.exists(candidate):
                continue
            found = isolation.runtime_for(candidate, for_others=as_root)
            if found is not None:
                python, dirs = found
                if self.allow_site_packages and candidate == sys.executable:
                    python, dirs = sys.executable, dirs + [os.path.realpath(sys.prefix)]
                return python, dirs
        raise InvalidParameterError(
            f"no Python interpreter that an unprivileged uid can run (tried {', '.join(candidates)}); as root the "
            "sandbox runs under a fresh uid: pass python= an interpreter outside root-only directories",
            param="python")

    def _limits(self) -> dict[str, list[int]]:
        cpu = math.ceil(self.timeout_s) + 1
        # RLIMIT_NPROC counts this uid's tasks in the run's own user namespace: this
        # process, bwrap's init, the budget and threads.
        processes = 2 + self.max_processes + self.max_threads
        mib = 1024 * 1024
        return {
            "RLIMIT_CPU": [cpu, cpu + 1],  # soft sends SIGXCPU, hard SIGKILL
            "RLIMIT_AS": [self.memory_mb * mib] * 2,
            "RLIMIT_FSIZE": [self.max_file_mb * mib] * 2,
            "RLIMIT_NOFILE": [self.max_open_files] * 2,
            "RLIMIT_NPROC": [processes] * 2,
            "RLIMIT_CORE": [0, 0],
        }

    def _run(self, code: str, python: str, runtime_dirs: list[str], uid: int | None,
             isolated: bool) -> CodeTestResult:
        nonce = secrets.token_hex(16)
        read_fd, write_fd = os.pipe()
        job = {
            "nonce": nonce, "result_fd": write_fd, "code": code, "setup": self.setup,
            # Neither the check (the expected literal) nor the name (the test's first line)
            # of a values test goes in: code in the sandbox must not learn the answer.
            "tests": [{key: value for key, value in test.items() if key in ("kind", "exprs", "source")
                       or (key == "name" and test["kind"] == "function")} for test in self.tests],
            "audit": self.audit_hook, "max_forks": self.max_processes, "max_files": self.max_files,
            "read_roots": list(_READ_ROOTS), "read_files": list(_READ_FILES),
            "blocked_modules": list(_BLOCKED_MODULES),
        }
        python_args = ["-I", "-B"] + ([] if self.allow_site_packages else ["-S"])
        limits = json.dumps(self._limits())
        extra_fds: list[int] = []
        workdir = None
        if isolated:
            extra_fds = [isolation.data_fd("thinkwise-child", _CHILD_SOURCE),
                         isolation.data_fd("thinkwise-seccomp", isolation.seccomp_program())]
            command = isolation.command(python=python, runtime_dirs=runtime_dirs, child_fd=extra_fds[0],
                                        seccomp_fd=extra_fds[1], tmpfs_bytes=self.max_disk_mb << 20,
                                        python_args=python_args + [isolation.CHILD_PATH, limits])
            cwd, environment = "/", {}
        else:
            # THE UNSAFE PATH (explicit opt-in only): the child runs as we do, with only
            # the audit hook and rlimits in its way.
            workdir = tempfile.mkdtemp(prefix="thinkwise-unsafe-")
            command = [python, *python_args, str(Path(__file__).with_name("sandbox_child.py")), limits]
            cwd, environment = workdir, {"HOME": workdir, "TMPDIR": workdir}
        privileges = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
        started = time.monotonic()
        deadline = started + self.timeout_s
        stdout, stderr, results = (_CappedBuffer(self.max_output_bytes), _CappedBuffer(self.max_output_bytes),
                                   _CappedBuffer(4 << 20))
        timed_out = False
        process = None
        try:
            try:
                process = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                    env=environment, pass_fds=(write_fd, *extra_fds), start_new_session=True, close_fds=True,
                    umask=0o077, **privileges,
                )
            finally:
                for fd in (write_fd, *extra_fds):
                    os.close(fd)
            try:
                process.stdin.write(json.dumps(job).encode("utf-8"))
                process.stdin.close()
            except (BrokenPipeError, OSError):
                pass  # the child died at start; its exit status tells why
            timed_out = self._collect(process, read_fd, stdout, stderr, results, deadline)
        finally:
            os.close(read_fd)
            if process is not None:
                self._cleanup(process, uid, python)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        result = self._classify(process, results, stdout, stderr, nonce, timed_out, time.monotonic() - started)
        result.sandbox_uid, result.python = uid, python
        result.isolation = "bubblewrap" if isolated else f"NONE ({isolation.UNSAFE_ENV} opt-in)"
        return result


    def _collect(self, process, read_fd, stdout, stderr, results, deadline) -> bool:
        """Drain the child's pipes until they close, the deadline passes, or the child has
        exited and a grace period is over (forked children may hold the pipes open).
        Returns whether the deadline passed with the child still running. The child is
        never reaped here: as a zombie it keeps its pid, so the process-group kill in
        `_cleanup` cannot hit a recycled id."""
        selector = selectors.DefaultSelector()
        buffers = {process.stdout.fileno(): stdout, process.stderr.fileno(): stderr, read_fd: results}
        for fd in buffers:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)

        def exited() -> bool:
            return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

        exited_at = None
        try:
            while True:
                now = time.monotonic()
                if exited_at is None and exited():
                    exited_at = now
                if not selector.get_map() or (exited_at is not None and now - exited_at > 0.2):
                    break
                if now >= deadline:
                    return exited_at is None
                for key, _ in selector.select(timeout=min(0.02, max(deadline - now, 0.001))):
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if chunk:
                        buffers[key.fd].add(chunk)
                    else:
                        selector.unregister(key.fd)
            while not exited():
                if time.monotonic() >= deadline:
                    return True
                time.sleep(0.005)
            return False
        finally:
            selector.close()

    def _cleanup(self, process, uid: int | None, python: str) -> None:
        # Still unreaped, so neither the pid nor the group id can have been recycled.
        # Killing bwrap ends its pid namespace (--die-with-parent): every process of the run.
        for kill in (lambda: os.killpg(process.pid, signal.SIGKILL), process.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        if uid is not None:
            _kill_uid(uid, python)  # also what left the process group
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def _classify(self, process, results, stdout, stderr, nonce, timed_out, wall) -> CodeTestResult:
        tests: dict[int, TestCaseResult] = {}
        refusals: list[str] = []
        denied: list[str] = []
        limits: list[str] = []
        done = ready = False
        candidate_error = ""
        for line in results.data.decode("utf-8", "replace").split("\n"):
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if not isinstance(message, dict) or message.get("nonce") != nonce:
                continue
            kind = message.get("kind")
            index = message.get("index")
            if (kind == "test" and type(index) is int and 0 <= index < len(self.tests)  # noqa: E721 (bool is not an index)
                    and index not in tests):
                test = self.tests[index]
                error = message.get("error")
                if test["kind"] == "values" and "values" in message:
                    passed, error = verdict(test["check"], message["values"])
                    if error and error.startswith("AssertionError"):
                        error += f" at <test {index}>: {test['name']}"
                elif test["kind"] == "values":
                    passed = False  # a bare "passed" claim is never taken for a values test
                else:
                    passed = message.get("passed") is True
                tests[index] = TestCaseResult(test["name"], passed, None if passed else str(error)[:2000])
            elif kind == "refused" and len(refusals) < 50:
                refusals.append(f"{message.get('event')}: {message.get('detail')}")
            elif kind == "denied_read" and len(denied) < 50:
                denied.append(f"{message.get('event')}: {message.get('detail')}")
            elif kind == "limit" and len(limits) < 50:
                limits.append(f"{message.get('limit')} limit: {message.get('detail')}")
            elif kind == "candidate_error":
                candidate_error = str(message.get("error"))[:2000]
            elif kind == "done":
                done = True
            elif kind == "ready":
                ready = True
        ordered = [tests.get(i, TestCaseResult(t["name"], False, "not run")) for i, t in enumerate(self.tests)]
        passed = sum(t.passed for t in ordered)
        total = len(ordered)
        returncode = process.returncode if process is not None else None
        killed_by = -returncode if returncode is not None and returncode < 0 else None
        stderr_text = stderr.text()
        if refusals:
            outcome, detail = "refused", refusals[0]
        elif timed_out or killed_by == signal.SIGXCPU:
            outcome, detail = "timeout", f"ran past {self.timeout_s:g}s"
        elif limits:
            outcome, detail = "refused", limits[0]
        elif not done and "MemoryError" in stderr_text:
            limits.append(f"memory limit ({self.memory_mb} MiB)")  # the harness itself ran out
            outcome, detail = "refused", limits[-1]
        elif not done:
            why = f"killed by signal {killed_by}" if killed_by else f"exit status {returncode}"
            if not ready:
                why += " before the harness started"
            tail = stderr_text.strip().split("\n")[-1] if stderr_text.strip() else ""
            outcome, detail = "crashed", why + (f": {tail}" if tail else "")
        elif passed == total:
            outcome, detail = "passed", f"{passed}/{total} tests passed"
        else:
            first_failure = next(t for t in ordered if not t.passed)
            outcome = "failed"
            detail = candidate_error or f"{passed}/{total} passed; {first_failure.name}: {first_failure.error}"
        score = 0.0 if (refusals and self.refusal_fails) else (passed / total if total else 0.0)
        return CodeTestResult(
            outcome=outcome, score=score, passed=passed, total=total, tests=ordered, refusals=refusals,
            limits=limits, denied_reads=denied, detail=detail, stdout=stdout.text(), stderr=stderr_text,
            returncode=returncode, wall_time_s=wall,
        )


def _warn_unsafe() -> None:
    global _warned_unsafe
    if not _warned_unsafe:
        _warned_unsafe = True
        message = (f"{isolation.UNSAFE_ENV}: running untrusted code WITHOUT kernel isolation (bubblewrap "
                   "unavailable); the code can read your files and environment and reach the network")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        print(f"WARNING: {message}", file=sys.stderr)
