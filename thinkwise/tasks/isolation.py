"""Kernel isolation for untrusted code: the bubblewrap command line and its seccomp filter.

Every sandboxed run is one `bwrap` process: fresh user, mount, pid, network, ipc, uts and
cgroup namespaces; a root of read-only binds (the system's /usr and the Python runtime)
and one size-bounded private tmpfs at /sandbox as the only writable place (also /tmp
and /dev/shm); no network (only a loopback of its own), no view of other processes;
`--die-with-parent` plus the pid namespace, so every process of the run dies with it;
no further user namespaces; a seccomp filter (built with the libseccomp binding, loaded
by bwrap from a memfd) that answers EPERM to what code tests never need: ptrace and
process_vm_*, mount and friends, kernel keyrings, bpf, pidfd signalling, namespaces,
module loading, perf, userfaultfd, io_uring. Where bubblewrap or the binding is missing
or user namespaces are off, `require()` raises `SandboxUnavailableError` naming what is
missing and how to install it; the only way around is the loudly named opt-in
`THINKWISE_UNSAFE_NO_SANDBOX=1` (or `CodeTestVerifier(unsafe_no_sandbox=True)`).
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import subprocess
import sys

from thinkwise.errors import ThinkwiseError

UNSAFE_ENV = "THINKWISE_UNSAFE_NO_SANDBOX"
SANDBOX_DIR = "/sandbox"  # the private tmpfs, the child's cwd, /tmp and /dev/shm
CHILD_PATH = "/thinkwise/sandbox_child.py"  # where the child program is mounted inside
SANDBOX_UID = 65534  # who the code is inside its user namespace (nobody)

# Syscalls a code test never needs. EPERM (not a kill) so stdlib probes fail cleanly.
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd",
    "pidfd_send_signal", "pidfd_open", "pidfd_getfd",
    "unshare", "setns",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "iopl", "ioperm", "open_by_handle_at",
    "personality",
)

INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`; "
                "`make install` does it) and libseccomp (Debian: libseccomp2, with the `pyseccomp` Python package)")


class SandboxUnavailableError(ThinkwiseError):
    """Untrusted code was about to run but kernel isolation is not available here."""


def unsafe_opt_in() -> bool:
    return os.environ.get(UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes")


def _refusal(what: str) -> SandboxUnavailableError:
    return SandboxUnavailableError(
        f"refusing to run untrusted code without kernel isolation: {what}. Fix: {INSTALL_HINT}. To run it "
        f"anyway with NO isolation (only on a throwaway machine), set {UNSAFE_ENV}=1")


def bwrap_path() -> str | None:
    return shutil.which("bwrap") or next((p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.access(p, os.X_OK)),
                                         None)


def _seccomp_module():
    try:
        import seccomp  # libseccomp's own binding (Debian python3-seccomp), where importable
        return seccomp
    except ImportError:
        pass
    try:
        import pyseccomp  # the same API over ctypes, from PyPI
        return pyseccomp
    except (ImportError, OSError, RuntimeError):  # OSError: libseccomp.so itself is missing
        return None


@functools.lru_cache(maxsize=1)
def seccomp_program() -> bytes:
    """The BPF program bwrap loads (built once per process)."""
    seccomp = _seccomp_module()
    if seccomp is None:
        raise _refusal("no libseccomp Python binding (pip install pyseccomp; needs libseccomp2)")
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    deny = seccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        try:
            rules.add_rule(deny, name)
        except (ValueError, RuntimeError, OSError):
            pass  # a syscall this architecture / libseccomp does not know cannot be called either
    fd = os.memfd_create("thinkwise-seccomp", 0)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            rules.export_bpf(out)
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def data_fd(name: str, data: bytes) -> int:
    """A memfd holding `data`, positioned at 0, for bwrap to read (`--seccomp`, `--ro-bind-data`)."""
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _root_links() -> list[str]:
    """/bin, /lib, /lib64, /sbin as on the host: symlinks into /usr (merged /usr) or read-only binds."""
    args = []
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def command(*, python: str, runtime_dirs: list[str], child_fd: int, seccomp_fd: int, tmpfs_bytes: int,
            python_args: list[str]) -> list[str]:
    """The bwrap command line for one run (fds must be passed to the Popen)."""
    bwrap = bwrap_path()
    if bwrap is None:
        raise _refusal("bubblewrap (`bwrap`) is not installed")
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
            "--clearenv", "--setenv", "HOME", SANDBOX_DIR, "--setenv", "TMPDIR", SANDBOX_DIR,
            "--ro-bind", "/usr", "/usr", *_root_links()]
    for directory in runtime_dirs:
        if directory != "/usr" and not directory.startswith("/usr/"):
            args += ["--ro-bind", directory, directory]
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        args += ["--ro-bind-try", path, path]
    args += ["--proc", "/proc",
             "--size", str(tmpfs_bytes), "--perms", "0700", "--tmpfs", SANDBOX_DIR,
             "--symlink", SANDBOX_DIR, "/tmp",
             # A /dev of our own with only harmless nodes, then read-only (--dev would leave
             # an unbounded writable tmpfs there); /dev/shm is the private tmpfs.
             "--tmpfs", "/dev"]
    for node in ("null", "zero", "full", "random", "urandom"):
        args += ["--dev-bind", f"/dev/{node}", f"/dev/{node}"]
    args += ["--symlink", "/proc/self/fd", "/dev/fd", "--symlink", SANDBOX_DIR, "/dev/shm",
             "--remount-ro", "/dev",
             "--ro-bind-data", str(child_fd), CHILD_PATH,
             "--remount-ro", "/",
             "--seccomp", str(seccomp_fd),
             "--chdir", SANDBOX_DIR,
             "--", python, *python_args]
    return args


def runtime_for(python: str, *, for_others: bool) -> tuple[str, list[str]] | None:
    """(interpreter, directories to bind) for `python`, or None when `for_others` (bwrap
    will run under a fresh uid) and that uid cannot reach it."""
    real = os.path.realpath(python)
    dirs = [os.path.dirname(os.path.dirname(real))]  # .../bin/python3 -> its prefix
    if os.path.realpath(sys.executable) == real:
        dirs = [os.path.realpath(sys.base_prefix)]
    if for_others and not all(traversable_by_others(d) for d in dirs + [real]):
        return None
    return real, dirs


def traversable_by_others(path: str) -> bool:
    current = os.path.realpath(path)
    parts = [current]
    while current != "/":
        current = os.path.dirname(current)
        parts.append(current)
    for directory in parts:
        try:
            if not os.stat(directory).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


_probe_results: dict[tuple, str | None] = {}


def require(python: str, runtime_dirs: list[str], user: int | None) -> None:
    """Raise SandboxUnavailableError unless bwrap can start a sandbox here (probed once per
    interpreter and uid mode, by running `python -c pass` inside one)."""
    key = (python, tuple(runtime_dirs), user is not None)
    if key not in _probe_results:
        problem = None
        if bwrap_path() is None:
            problem = "bubblewrap (`bwrap`) is not installed"
        else:
            try:
                program = seccomp_program()
            except SandboxUnavailableError as error:
                raise error
            child_fd, seccomp_fd = data_fd("probe-child", b"pass\n"), data_fd("probe-seccomp", program)
            try:
                probe = subprocess.run(
                    command(python=python, runtime_dirs=runtime_dirs, child_fd=child_fd, seccomp_fd=seccomp_fd,
                            tmpfs_bytes=1 << 20, python_args=["-I", "-S", CHILD_PATH]),
                    pass_fds=(child_fd, seccomp_fd), capture_output=True, text=True, timeout=30, cwd="/",
                    env={}, **({"user": user, "group": user, "extra_groups": []} if user is not None else {}))
                if probe.returncode != 0:
                    problem = (f"bubblewrap could not start a sandbox ({probe.stderr.strip()[-300:]}); user "
                               "namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1, "
                               "user.max_user_namespaces > 0, or an AppArmor userns restriction)")
            except (OSError, subprocess.SubprocessError) as error:
                problem = f"bubblewrap could not be run: {error}"
            finally:
                os.close(child_fd)
                os.close(seccomp_fd)
        _probe_results[key] = problem
    if _probe_results[key] is not None:
        raise _refusal(_probe_results[key])
