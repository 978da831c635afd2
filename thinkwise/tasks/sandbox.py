"""The sandboxed code-test runner: runs untrusted model-written code against unit tests.

`CodeTestVerifier` scores a completion by the fraction of tests its code passes. It is
built as a sandbox with two layers: in the child interpreter (`python -I`, empty
environment, fresh temp directory as cwd, its own process group) an audit hook refuses
writes outside the temp directory, process creation beyond a budget, program execution,
network, native-code loading (ctypes, non-stdlib extensions), signals to other processes
and debugger hooks; underneath, the kernel enforces resource limits (CPU, address space,
file size, open files, process count) and, when we run as root, a fresh unprivileged uid
per run so file permissions, RLIMIT_NPROC (which root ignores) and signal permissions
apply, and everything left running under that uid is killed afterwards. The sandbox
protects the host, not the score: code running in the same interpreter as its tests can
always find a way to fake passing them. See `CodeTestVerifier` for the limits that
remain. It lives in tasks/ so the code task family can check answers with it;
`thinkwise.tasks.verifiers` re-exports it for best-of-n.
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from thinkwise.errors import InvalidParameterError
from thinkwise.tasks.extraction import fenced_code_blocks

__all__ = ["CodeTestVerifier", "CodeTestResult", "TestCaseResult", "code_from_completion", "OUTCOMES"]

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
    sandbox refused an operation (write outside the temp dir, exec, network, fork beyond
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


# The child's whole program before the candidate runs. It sets its own resource limits
# first (hard limits too, so they can never be raised again), reads the job from stdin,
# installs the audit hook, then runs the candidate and the tests, reporting each result
# as one JSON line (< PIPE_BUF, so lines from forked children never interleave) on a
# dedicated pipe. Limits are set here rather than in a preexec_fn because preexec_fn
# runs Python between fork and exec, which CPython documents as unsafe in a threaded
# process - and the engine is one; the privilege drop itself is done by Popen's
# user/group arguments in C. Must stay valid Python 3.8+: it may run on a system
# interpreter rather than ours.
_BOOTSTRAP = r'''
import json, os, resource, sys

def _set_limits(limits):
    for name, (soft, hard) in limits.items():
        which = getattr(resource, name)
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)  # an unprivileged child cannot raise a hard limit
        resource.setrlimit(which, (min(soft, hard), hard))

_set_limits(json.loads(sys.argv[1]))


def _main():
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    import builtins, linecache, traceback, types
    nonce, out = job["nonce"], job["result_fd"]

    def report(kind, **fields):
        fields["kind"] = kind
        fields["nonce"] = nonce
        for key, value in fields.items():
            if isinstance(value, str) and len(value) > 1500:
                fields[key] = value[:1500] + "..."
        try:
            os.write(out, (json.dumps(fields) + "\n").encode("utf-8", "replace"))
        except OSError:
            pass

    if job["audit"]:
        _lock_down(job, report)
    report("ready")

    def describe(error):
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith("<")]
        where = ""
        if frames and frames[-1].line:
            where = " at %s line %d: %s" % (frames[-1].filename, frames[-1].lineno, frames[-1].line.strip())
        if isinstance(error, MemoryError):
            report("limit", limit="memory", detail="MemoryError" + where)
        elif isinstance(error, OSError) and error.errno == 27:  # EFBIG: RLIMIT_FSIZE
            report("limit", limit="file_size", detail=str(error) + where)
        text = "%s: %s" % (type(error).__name__, error) if str(error) else type(error).__name__
        return text + where

    def load(source, filename):
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        return compile(source, filename, "exec")

    tests = job["tests"]
    module = types.ModuleType("solution")
    sys.modules["solution"] = module  # tests may `from solution import f`
    try:
        exec(load(job["code"], "<solution>"), module.__dict__)
    except BaseException as error:  # SystemExit and KeyboardInterrupt included: the code must not end the run
        message = "solution raised " + describe(error)
        report("candidate_error", error=message)
        for index, test in enumerate(tests):
            report("test", index=index, name=test["name"], passed=False, error=message)
        report("done")
        return
    namespace = dict(module.__dict__)
    if job["setup"] is not None:
        try:
            exec(load(job["setup"], "<tests>"), namespace)
        except BaseException as error:
            message = "test setup raised " + describe(error)
            for index, test in enumerate(tests):
                report("test", index=index, name=test["name"], passed=False, error=message)
            report("done")
            return
    for index, test in enumerate(tests):
        try:
            if test["source"] is None:
                namespace[test["name"]]()
            else:
                exec(load(test["source"], "<test %d>" % index), dict(namespace))
        except BaseException as error:
            report("test", index=index, name=test["name"], passed=False, error=describe(error))
        else:
            report("test", index=index, name=test["name"], passed=True)
    report("done")


def _lock_down(job, report):
    import importlib.machinery, stat, _imp
    import posix
    tmp = os.path.realpath(os.getcwd())
    roots = []
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            roots.append(os.path.realpath(entry))
    # Nothing but the standard library (and site-packages when allowed) is importable.
    sys.path[:] = [entry for entry in sys.path if entry and os.path.isdir(entry)]
    read_roots = tuple(roots) + tuple(job["read_roots"])
    read_files = frozenset(job["read_files"])
    blocked_modules = frozenset(job["blocked_modules"])
    extension_suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    O_CREAT, O_DIRECTORY = os.O_CREAT, getattr(os, "O_DIRECTORY", 0)
    AF_UNIX = 1
    realpath, join, getcwd, readlink, getpid, fsdecode, isdir = (
        os.path.realpath, os.path.join, os.getcwd, os.readlink, os.getpid, os.fsdecode, os.path.isdir)
    forks_left = job["max_forks"]
    files_left = job["max_files"]

    # Built-in modules cannot be blocked by the import event alone: _imp.create_builtin
    # makes a fresh copy without raising one. So import every allowed built-in now and
    # take create_builtin away; blocked built-ins then can never be created.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. spwd's deprecation notice
        for name in sys.builtin_module_names:
            if name not in blocked_modules and name not in sys.modules:
                try:
                    __import__(name)
                except Exception:
                    pass
    # subprocess (and so asyncio) imports _posixsubprocess at import time; keep those
    # imports working but make its fork_exec - which raises no audit event - refuse.
    import _posixsubprocess

    def refuser(what):
        def refused(*args, **kwargs):
            report("refused", event=what, detail="not allowed in the sandbox")
            raise PermissionError("thinkwise sandbox refused %s" % what)
        return refused

    _posixsubprocess.fork_exec = refuser("_posixsubprocess.fork_exec")
    for name in ("mkfifo", "mknod", "setsid", "setpgid", "setpgrp"):
        # No audit events exist for these: special files outside the temp dir, and
        # leaving the process group (which is how runs are cleaned up).
        for target in (os, posix):
            if hasattr(target, name):
                setattr(target, name, refuser("os." + name))
    _imp.create_builtin = refuser("_imp.create_builtin")

    def inside(path, root):
        return path == root or path.startswith(root.rstrip("/") + "/")

    def resolve(path, dir_fd=None):
        if isinstance(path, int):
            try:
                target = readlink("/proc/self/fd/%d" % path)
            except OSError:
                return None
            return target if target.startswith("/") else None  # pipes, sockets, anonymous files
        path = fsdecode(path)
        base = getcwd()
        if dir_fd is not None and dir_fd != -1 and not path.startswith("/"):
            base = readlink("/proc/self/fd/%d" % dir_fd)
        return realpath(join(base, path))

    def may_write(path, dir_fd=None):
        resolved = resolve(path, dir_fd)
        return resolved is None or inside(resolved, tmp) or resolved == "/dev/null"

    def may_read(resolved):
        if resolved is None or inside(resolved, tmp) or resolved in read_files:
            return True
        if inside(resolved, "/proc/%d" % getpid()):
            return True
        return any(inside(resolved, root) for root in read_roots)

    def refuse(event, detail):
        report("refused", event=event, detail=detail)
        raise PermissionError("thinkwise sandbox refused %s: %s" % (event, detail))

    def deny_read(event, detail):
        report("denied_read", event=event, detail=detail)
        raise PermissionError("thinkwise sandbox denied %s: %s" % (event, detail))

    write_events = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
        "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
        "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.chflags": ((0, None),),
        "os.lchflags": ((0, None),), "os.rename": ((0, 2), (1, 3)), "shutil.copyfile": ((1, None),),
        "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),),
        "shutil.rmtree": ((0, 1),), "shutil.move": ((0, None), (1, None)), "shutil.chown": ((0, None),),
        "shutil.unpack_archive": ((1, None),), "shutil.make_archive": ((0, None),),
    }
    always_refused = frozenset((
        "os.link", "os.symlink", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
        "os.startfile", "os.killpg", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo",
        "socket.sethostname", "sys.settrace", "sys.setprofile", "gc.get_referrers", "gc.get_referents",
        "gc.get_objects", "sqlite3.enable_load_extension", "sqlite3.load_extension", "webbrowser.open",
        "setopencodehook", "cpython.PyInterpreterState_New", "syslog.openlog", "syslog.syslog",
        # Newer interpreters (the child may run a system Python newer than ours):
        "sys.monitoring.register_callback", "os.unshare", "os.setns", "sys.remote_exec",
    ))

    checked = frozenset(("open", "os.listdir", "os.scandir", "os.fork", "os.forkpty", "os.kill", "resource.prlimit",
                         "socket.__new__", "socket.sendmsg", "sqlite3.connect", "import")) | frozenset(write_events)

    def hook(event, args):
        nonlocal forks_left, files_left
        if event not in checked and event not in always_refused and not event.startswith("ctypes."):
            return
        try:
            if event == "open":
                path, mode, flags = args
                if path is None or isinstance(path, int):
                    return
                flags = flags or 0
                writing = bool(flags & WRITE_FLAGS) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
                text = fsdecode(path)
                if not text.startswith("/") and ".." in text.replace("\\", "/").split("/"):
                    # os.open(path, dir_fd=fd) resolves against fd, which this event does
                    # not show; without "..", a relative path stays under that directory.
                    if writing:
                        refuse("open for writing", "relative path with '..': %s" % text)
                    deny_read("open for reading", "relative path with '..': %s" % text)
                resolved = resolve(path)
                if writing:
                    if not (inside(resolved, tmp) or resolved == "/dev/null"):
                        refuse("open for writing", resolved)
                    if flags & O_CREAT:
                        files_left -= 1
                        if files_left < 0:
                            refuse("open for writing", "more than %d files created" % job["max_files"])
                if not inside(resolved, tmp) and (flags & O_DIRECTORY or isdir(resolved)):
                    # A directory fd outside would let dir_fd-relative writes escape the path checks.
                    refuse("open directory", resolved)
                if not writing and not may_read(resolved):
                    if resolved.startswith("/proc/"):
                        refuse("read another process's /proc", resolved)
                    deny_read("open for reading", resolved)
            elif event in write_events:
                for path_index, fd_index in write_events[event]:
                    if len(args) <= path_index or args[path_index] is None:
                        continue
                    dir_fd = args[fd_index] if fd_index is not None and len(args) > fd_index else None
                    if not may_write(args[path_index], dir_fd):
                        refuse(event, str(args[path_index]))
                if event == "os.mkdir":
                    files_left -= 1
                    if files_left < 0:
                        refuse(event, "more than %d files created" % job["max_files"])
            elif event in ("os.listdir", "os.scandir"):
                path = args[0] if args else None
                resolved = resolve(path if path is not None else ".")
                if not may_read(resolved):
                    deny_read(event, str(resolved))
            elif event in ("os.fork", "os.forkpty"):
                if forks_left <= 0:
                    refuse(event, "process budget of %d exhausted" % job["max_forks"])
                forks_left -= 1
            elif event in always_refused or event.startswith("ctypes."):
                refuse(event, repr(args)[:200])
            elif event == "os.kill":
                if args[0] != getpid():
                    refuse(event, "signal to pid %r" % (args[0],))
            elif event == "resource.prlimit":
                if args[0] not in (0, getpid()):
                    refuse(event, "limits of pid %r" % (args[0],))
            elif event == "socket.__new__":
                if args[1] != AF_UNIX:
                    refuse(event, "network sockets are not allowed")
            elif event == "socket.sendmsg":
                if len(args) > 1 and args[1] is not None:
                    refuse(event, "sendmsg to an address")
            elif event == "sqlite3.connect":
                database = args[0]
                if database not in (":memory:", "", b":memory:", b"") and not may_write(database):
                    refuse(event, str(database))
            elif event == "import":
                name, filename = args[0], args[1]
                if name in blocked_modules or name.split(".")[0] in blocked_modules:
                    # ImportError, not a refusal: stdlib code probes optional modules
                    # inside `try: import x / except ImportError`.
                    raise ImportError("thinkwise sandbox: module %r is not available" % name)
                if filename and str(filename).endswith(extension_suffixes):
                    resolved = realpath(fsdecode(filename))
                    if not any(inside(resolved, root) for root in read_roots):
                        refuse("load native extension", resolved)
        except (PermissionError, ImportError):
            raise
        except Exception as error:  # a check that cannot decide fails closed
            report("refused", event=event, detail="check failed: %r" % (error,))
            raise PermissionError("thinkwise sandbox refused %s" % event)

    def child_after_fork():
        nonlocal forks_left
        forks_left = 0  # only the top process may fork: the budget is a total, not per level

    os.register_at_fork(after_in_child=child_after_fork)
    sys.addaudithook(hook)


_exit_status = 0
try:
    _main()
except BaseException:
    _exit_status = 1
    try:
        import traceback
        traceback.print_exc()
    except BaseException:
        pass
finally:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(_exit_status)  # skip the candidate's atexit handlers and non-daemon threads
'''

# Modules that hand out primitives the audit hook cannot see: foreign-function calls,
# process spawning without audit events, shared memory and dbm files written from C,
# subinterpreters (audit hooks added from Python are per interpreter), profilers, test
# helpers that poke at interpreter internals.
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
_FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3.11", "/usr/bin/python")

_probe_lock = threading.Lock()
_python_for_uid_cache: dict[tuple[str, bool], str | None] = {}
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


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


def _user_tasks(uid: int) -> int:
    """Threads owned by `uid`: what RLIMIT_NPROC counts against."""
    total = 0
    for fields in _process_statuses():
        if "Uid" in fields and int(fields["Uid"].split()[0]) == uid:
            total += int(fields["Threads"].split()[0]) if "Threads" in fields else 1
    return total


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


def _python_for_uid(preferred: str, explicit: bool, uid: int) -> str | None:
    """An interpreter that `uid` can execute (ours may live under a root-only directory,
    e.g. pyenv in /root); probed once per interpreter and cached."""
    key = (preferred, explicit)
    with _probe_lock:
        if key in _python_for_uid_cache:
            return _python_for_uid_cache[key]
        candidates = [preferred] if explicit else [preferred, os.path.realpath(preferred), *_FALLBACK_PYTHONS]
        found = None
        for python in dict.fromkeys(candidates):
            if not os.path.exists(python):
                continue
            try:
                probe = subprocess.run(
                    [python, "-I", "-S", "-c", "import sys; print(sys.version_info >= (3, 8))"],
                    user=uid, group=uid, extra_groups=[], env={}, cwd="/", capture_output=True, text=True,
                    timeout=20, check=False,
                )
            except (OSError, subprocess.SubprocessError):
                continue
            if probe.returncode == 0 and probe.stdout.strip() == "True":
                found = python
                break
        _python_for_uid_cache[key] = found
        return found


def _traversable_by_others(path: str) -> bool:
    current = Path(path).resolve()
    for directory in (current, *current.parents):
        try:
            if not directory.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


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
    """Runs the code in a completion against unit tests in a sandboxed subprocess.

    `tests` is a list of test snippets (each one test: asserts, calls) or one source
    string: if it defines top-level `test_*` functions each is a test and the rest of
    the source is shared setup, otherwise the whole string is one test. The candidate's
    code becomes module `solution` (tests see its names directly and may also
    `from solution import f`); each test runs in its own copy of that namespace. Score =
    fraction of tests passed, 0.0 when the sandbox had to refuse an operation (with
    `refusal_fails`); `run()` returns the full `CodeTestResult`.

    Layers and limits, and what is not closed:
    - Audit hook (in the child, installed before the candidate runs): writes only in the
      temp dir (at most `max_files` files created), reads only there and in the standard
      library (other reads raise PermissionError but do not count as refusals, except
      other processes' /proc entries); no symlinks/hard links, no directory fds outside;
      `max_processes` forks in total and only from the top process; no exec, spawn,
      system or subprocess; no network sockets or DNS; no ctypes/cffi, no extension
      modules from outside the stdlib, no subinterpreters, settrace/setprofile or
      gc.get_referrers; signals only to itself. Audit hooks are not a security boundary
      on their own (CPython says so): they are the layer that catches the obvious and
      reports it, which is why the kernel layer sits underneath.
    - Kernel: RLIMIT_CPU, RLIMIT_AS (`memory_mb`), RLIMIT_FSIZE (`max_file_mb`),
      RLIMIT_NOFILE, RLIMIT_CORE=0 and RLIMIT_NPROC = 1 + max_processes + max_threads (it
      counts threads too). Root ignores RLIMIT_NPROC and file permissions, so when we
      run as root each run gets a fresh unused uid/gid (no supplementary groups): NPROC
      then bounds that run alone, root-owned files are read-only to it, it cannot signal
      or ptrace anything else, and afterwards every process of that uid is killed, even
      ones that left the process group. Our interpreter may sit in a root-only directory
      (pyenv under /root), so the child then runs on the first system Python that uid
      can execute; `result.python` says which. Without root, the child keeps our uid:
      NPROC is then set to the user's current task count plus the budget (a per-user
      count, so only approximately per run) and cleanup is by process group only.
    - Wall clock: `timeout_s` from spawn, then SIGKILL to the process group (and uid).
    Not closed: world-writable directories (/tmp, /dev/shm) are protected by the audit
    hook alone - the fresh uid can write there at the kernel level; there is no network
    namespace, so the socket ban is the hook's; disk use is bounded only by max_files x
    max_file_mb; code in the child can tamper with the harness it shares an interpreter
    with (forge results, read the tests), so scores are not robust to adversarial code;
    stdlib functions that probe subprocesses (uuid.uuid1()) trip a refusal. For hostile
    workloads put the verifier inside a container or VM with no network.
    """

    def __init__(self, tests: str | Sequence[str], *, timeout_s: float = 5.0, memory_mb: int = 256,
                 max_processes: int = 0, max_threads: int = 8, max_file_mb: int = 16, max_files: int = 64,
                 max_open_files: int = 64, max_output_bytes: int = 64 * 1024, allow_site_packages: bool = False,
                 drop_privileges: bool | None = None, python: str | None = None, refusal_fails: bool = True,
                 audit_hook: bool = True, max_parallel: int | None = None):
        self.setup, self.tests = self._parse_tests(tests)
        for name, value, low in (("timeout_s", timeout_s, 0.05), ("memory_mb", memory_mb, 64),
                                 ("max_file_mb", max_file_mb, 1), ("max_open_files", max_open_files, 16),
                                 ("max_output_bytes", max_output_bytes, 1024)):
            if not isinstance(value, (int, float)) or value < low:
                raise InvalidParameterError(f"CodeTestVerifier {name} must be at least {low}, got {value!r}",
                                            param=name)
        for name, value in (("max_processes", max_processes), ("max_threads", max_threads),
                            ("max_files", max_files)):
            if not isinstance(value, int) or value < 0:
                raise InvalidParameterError(f"CodeTestVerifier {name} must be a non-negative integer, got {value!r}",
                                            param=name)
        is_root = os.geteuid() == 0
        if drop_privileges and not is_root:
            raise InvalidParameterError("drop_privileges=True needs root (the sandbox switches to a fresh uid); "
                                        "leave it unset to drop only when running as root", param="drop_privileges")
        if python is not None and not os.path.exists(python):
            raise InvalidParameterError(f"python interpreter {python!r} does not exist", param="python")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_processes = max_processes
        self.max_threads = max_threads
        self.max_file_mb = int(max_file_mb)
        self.max_files = max_files
        self.max_open_files = int(max_open_files)
        self.max_output_bytes = int(max_output_bytes)
        self.allow_site_packages = allow_site_packages
        self.drop_privileges = is_root if drop_privileges is None else bool(drop_privileges)
        self._explicit_drop = drop_privileges is True
        self.python = python or sys.executable
        self._explicit_python = python is not None
        self.refusal_fails = refusal_fails
        self.audit_hook = audit_hook
        self.max_parallel = max_parallel or os.cpu_count() or 1

    @staticmethod
    def _parse_tests(tests) -> tuple[str | None, list[dict]]:
        if isinstance(tests, str):
            try:
                tree = ast.parse(tests)
            except SyntaxError as error:
                raise InvalidParameterError(f"tests do not parse as Python: {error}", param="tests") from None
            names = [node.name for node in tree.body
                     if isinstance(node, ast.FunctionDef) and node.name.startswith("test")]
            if names:
                return tests, [{"name": name, "source": None} for name in names]
            if not tree.body:
                raise InvalidParameterError("tests are empty; give assert statements or test_* functions",
                                            param="tests")
            return None, [{"name": "tests", "source": tests}]
        if not isinstance(tests, Sequence) or not tests:
            raise InvalidParameterError("tests must be a source string or a non-empty list of test snippets",
                                        param="tests")
        parsed = []
        for index, source in enumerate(tests):
            if not isinstance(source, str) or not source.strip():
                raise InvalidParameterError(f"test {index} must be a non-empty string of Python, got {source!r}",
                                            param="tests")
            try:
                compile(source, f"<test {index}>", "exec")
            except SyntaxError as error:
                raise InvalidParameterError(f"test {index} does not parse as Python: {error}", param="tests") from None
            first_line = source.strip().split("\n")[0]
            parsed.append({"name": first_line[:80], "source": source})
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
        """Run the code in `completion` (fenced block or bare program) against the tests."""
        code = code_from_completion(completion)
        uid = _allocate_uid() if self.drop_privileges else None
        if self.drop_privileges and uid is None:
            if self._explicit_drop:
                raise InvalidParameterError("no free uid to run the sandbox under; pass drop_privileges=False",
                                            param="drop_privileges")
        try:
            python = self.python
            if uid is not None:
                python = _python_for_uid(self.python, self._explicit_python, uid)
                if python is None:
                    if self._explicit_drop or self._explicit_python:
                        raise InvalidParameterError(
                            f"the sandbox uid cannot execute {self.python!r} (is it under a root-only directory?); "
                            "pass python= an interpreter readable by all users", param="python")
                    _release_uid(uid)
                    uid, python = None, self.python
            return self._run(code, python, uid)
        finally:
            if uid is not None:
                _release_uid(uid)

    # -- the run itself

    def _limits(self, uid: int | None) -> dict[str, list[int]]:
        cpu = math.ceil(self.timeout_s) + 1
        processes = 1 + self.max_processes + self.max_threads
        if uid is None and os.geteuid() != 0:
            # Per-user count: leave room for what the user already runs.
            processes += _user_tasks(os.getuid())
        mib = 1024 * 1024
        return {
            "RLIMIT_CPU": [cpu, cpu + 1],  # soft sends SIGXCPU, hard SIGKILL
            "RLIMIT_AS": [self.memory_mb * mib] * 2,
            "RLIMIT_FSIZE": [self.max_file_mb * mib] * 2,
            "RLIMIT_NOFILE": [self.max_open_files] * 2,
            "RLIMIT_NPROC": [processes] * 2,
            "RLIMIT_CORE": [0, 0],
        }

    def _run(self, code: str, python: str, uid: int | None) -> CodeTestResult:
        nonce = secrets.token_hex(16)
        # The fresh uid must be able to reach its cwd: a TMPDIR under /root would not do.
        parent = None if uid is None or _traversable_by_others(tempfile.gettempdir()) else "/tmp"
        workdir = tempfile.mkdtemp(prefix="thinkwise-sandbox-", dir=parent)
        os.chmod(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        read_fd, write_fd = os.pipe()
        job = {
            "nonce": nonce, "result_fd": write_fd, "code": code, "setup": self.setup, "tests": self.tests,
            "audit": self.audit_hook, "max_forks": self.max_processes, "max_files": self.max_files,
            "read_roots": list(_READ_ROOTS), "read_files": list(_READ_FILES),
            "blocked_modules": list(_BLOCKED_MODULES),
        }
        command = [python, "-I", "-B"] + ([] if self.allow_site_packages else ["-S"])
        command += ["-c", _BOOTSTRAP, json.dumps(self._limits(uid))]
        # Only the temp dir, nothing inherited: not PATH, not API keys, not HF tokens.
        environment = {"HOME": workdir, "TMPDIR": workdir}
        privileges = dict(user=uid, group=uid, extra_groups=[]) if uid is not None else {}
        started = time.monotonic()
        deadline = started + self.timeout_s
        stdout, stderr, results = (_CappedBuffer(self.max_output_bytes), _CappedBuffer(self.max_output_bytes),
                                   _CappedBuffer(1 << 20))
        timed_out = False
        process = None
        try:
            try:
                process = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                    env=environment, pass_fds=(write_fd,), start_new_session=True, close_fds=True, umask=0o077,
                    **privileges,
                )
            finally:
                os.close(write_fd)
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
            shutil.rmtree(workdir, ignore_errors=True)
        return self._classify(process, results, stdout, stderr, nonce, timed_out, time.monotonic() - started,
                              uid, python)

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

    def _classify(self, process, results, stdout, stderr, nonce, timed_out, wall, uid, python) -> CodeTestResult:
        tests: dict[int, TestCaseResult] = {}
        refusals: list[str] = []
        denied: list[str] = []
        limits: list[str] = []
        done = ready = False
        candidate_error = ""
        for line in results.data.decode("utf-8", "replace").split("\n"):
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict) or message.get("nonce") != nonce:
                continue
            kind = message.get("kind")
            if kind == "test" and isinstance(message.get("index"), int) and message["index"] not in tests:
                tests[message["index"]] = TestCaseResult(str(message.get("name")), bool(message.get("passed")),
                                                         message.get("error"))
            elif kind == "refused" and len(refusals) < 50:
                refusals.append(f"{message.get('event')}: {message.get('detail')}")
            elif kind == "denied_read" and len(denied) < 50:
                denied.append(f"{message.get('event')}: {message.get('detail')}")
            elif kind == "limit":
                limits.append(f"{message.get('limit')} limit: {message.get('detail')}")
            elif kind == "candidate_error":
                candidate_error = str(message.get("error"))
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
            returncode=returncode, wall_time_s=wall, sandbox_uid=uid, python=python,
        )
