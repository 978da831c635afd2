"""The program the sandbox's child interpreter runs: it checks one candidate solution.

`sandbox.py` starts it by path inside the kernel sandbox (bubblewrap: fresh namespaces,
seccomp, read-only runtime, a private tmpfs) as `python -I -B -S sandbox_child.py LIMITS`.
Before any candidate code runs it sets its resource limits (hard ones too, so they can
never be raised again), reads the job from stdin and installs the audit hook (a second
layer that names refusals; the kernel is the boundary). Then it runs the candidate as
module `solution` and the tests. Results leave as one JSON line each on a dedicated pipe.
Checking is honest by construction: for a test of the form `assert A == B` (and other
single comparisons or `assert E`) the parent never sends the expected side when it is a
literal; the child only evaluates the operands and serializes them to plain, tagged data
(exact builtin types: an object that overrides `__eq__` cannot be encoded), and the
parent compares them. Asserts in other tests are rewritten so each comparison first
checks both sides are plain data. This file is imported by nothing: it must stay valid
Python 3.8+, since it may run on a system interpreter rather than ours.
"""
import json, os, resource, sys


def _set_limits(limits):
    for name, (soft, hard) in limits.items():
        which = getattr(resource, name)
        current_hard = resource.getrlimit(which)[1]
        if current_hard != resource.RLIM_INFINITY:
            hard = min(hard, current_hard)  # an unprivileged child cannot raise a hard limit
        resource.setrlimit(which, (min(soft, hard), hard))


_set_limits(json.loads(sys.argv[1]))

_MAX_DEPTH = 64
_MAX_ITEMS = 100000


class NotPlain(Exception):
    """A value that is not plain data (or too deep / too large to send)."""


def plain(value, depth=0, budget=None):
    """`value` as tagged JSON. Exact type checks (`type(v) is int`, never isinstance), so a
    subclass or an object with its own __eq__/__bool__ cannot pass as plain data."""
    if budget is None:
        budget = [_MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0 or depth > _MAX_DEPTH:
        raise NotPlain("value too large or too deeply nested to compare")
    kind = type(value)
    if value is None:
        return ["none"]
    if kind is bool:
        return ["bool", value]
    if kind is int:
        return ["int", hex(value)]  # hex: no int-to-str digit limit, exact
    if kind is float:
        return ["float", value.hex()]
    if kind is complex:
        return ["complex", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["str", value]
    if kind is bytes:
        return ["bytes", value.hex()]
    if kind in (list, tuple, set, frozenset):
        items = [plain(item, depth + 1, budget) for item in value]
        return [kind.__name__, items]
    if kind is dict:
        return ["dict", [[plain(k, depth + 1, budget), plain(v, depth + 1, budget)] for k, v in value.items()]]
    raise NotPlain("returned a value of type %s.%s, which is not plain data (only None, bool, int, float, complex, "
                   "str, bytes, list, tuple, set, frozenset and dict of those are compared)"
                   % (kind.__module__, kind.__qualname__))


def _make_checked_compare():
    import operator
    ops = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
           "GtE": operator.ge, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b}

    def checked_compare(op, left, right):
        plain(left)
        plain(right)  # raises NotPlain: the comparison is not decided by the values' own methods
        return ops[op](left, right)
    return checked_compare


def rewrite_asserts(tree, helper):
    """`assert A op B` -> `assert helper('op', A, B)`, for every single comparison."""
    import ast

    class Rewriter(ast.NodeTransformer):
        def visit_Assert(self, node):
            test = node.test
            if (isinstance(test, ast.Compare) and len(test.ops) == 1
                    and type(test.ops[0]).__name__ in ("Eq", "NotEq", "Lt", "LtE", "Gt", "GtE", "In", "NotIn")):
                call = ast.Call(func=ast.Name(id=helper, ctx=ast.Load()),
                                args=[ast.Constant(value=type(test.ops[0]).__name__), test.left, test.comparators[0]],
                                keywords=[])
                node.test = ast.copy_location(call, test)
            return node
    return ast.fix_missing_locations(Rewriter().visit(tree))


def _main():
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # tests may print or build big numbers; values travel as hex anyway
    import ast, linecache, traceback, types
    nonce, out = job["nonce"], job["result_fd"]
    dumps, encode, write = json.dumps, str.encode, os.write
    checked_compare = _make_checked_compare()
    helper = "__thinkwise_compare__"

    def report(kind, **fields):
        fields["kind"] = kind
        fields["nonce"] = nonce
        for key, value in fields.items():
            if isinstance(value, str) and len(value) > 1500:
                fields[key] = value[:1500] + "..."
        try:
            write(out, encode(dumps(fields) + "\n", "utf-8", "replace"))
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
        if isinstance(error, NotPlain):
            return "not plain data: %s%s" % (error, where)
        text = "%s: %s" % (type(error).__name__, error) if str(error) else type(error).__name__
        return text + where

    def load(source, filename, mode="exec", rewrite=False):
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        tree = ast.parse(source, filename, mode)
        if rewrite:
            tree = rewrite_asserts(tree, helper)
        return compile(tree, filename, mode)

    tests = job["tests"]
    module = types.ModuleType("solution")
    sys.modules["solution"] = module  # tests may `from solution import f`
    try:
        exec(load(job["code"], "<solution>"), module.__dict__)
    except BaseException as error:  # SystemExit and KeyboardInterrupt included: the code must not end the run
        message = "solution raised " + describe(error)
        report("candidate_error", error=message)
        for index, test in enumerate(tests):
            report("test", index=index, passed=False, error=message)
        report("done")
        return
    namespace = dict(module.__dict__)
    namespace[helper] = checked_compare
    if job["setup"] is not None:
        try:
            exec(load(job["setup"], "<tests>", rewrite=True), namespace)
        except BaseException as error:
            message = "test setup raised " + describe(error)
            for index, test in enumerate(tests):
                report("test", index=index, passed=False, error=message)
            report("done")
            return
    for index, test in enumerate(tests):
        try:
            if test["kind"] == "values":
                # Only the operands are evaluated here; the parent compares them.
                scope = dict(namespace)
                values = [plain(eval(load(source, "<test %d>" % index, "eval"), scope)) for source in test["exprs"]]
                report("test", index=index, values=values)
                continue
            if test["kind"] == "function":
                namespace[test["name"]]()
            else:
                exec(load(test["source"], "<test %d>" % index, rewrite=True), dict(namespace))
        except BaseException as error:
            report("test", index=index, passed=False, error=describe(error))
        else:
            report("test", index=index, passed=True)
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
                if any(part in blocked_modules for part in name.split(".")):  # the loader uses the last part
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
