"""Red team: every attack in `attacks.py`, run as we are (root in CI) and as an unprivileged
user, with the audit layer on and off (the kernel sandbox alone), each judged by an effect
seen from OUTSIDE the sandbox: files that must not appear, connections that must not
arrive at listeners we run, secrets that must not show up in any output, signals that
must not arrive, processes that must not survive or die, wrong solutions that must score 0.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.security import attacks
from thinkwise.tasks import isolation

NOBODY = 65534
HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parents[1] / "thinkwise"


class Listeners:
    """A TCP listener on 127.0.0.1 (and ::1 where possible), a unix socket in the shared
    directory and an abstract unix socket; records every connection that arrives."""

    def __init__(self, shared: Path, token: str):
        self.arrived: list[str] = []
        self.sockets = []
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", 0))
        self.port = tcp.getsockname()[1]
        self.sockets.append(("tcp4", tcp))
        try:
            tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            tcp6.bind(("::1", self.port))
            self.sockets.append(("tcp6", tcp6))
        except OSError:
            pass
        self.unix_path = str(shared / "listener.sock")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        self.sockets.append(("unix", unix))
        self.abstract = f"thinkwise-redteam-{token}"
        abstract = socket.socket(socket.AF_UNIX)
        abstract.bind("\0" + self.abstract)
        self.sockets.append(("abstract", abstract))
        for name, sock in self.sockets:
            sock.listen(16)
            sock.settimeout(0.2)
            threading.Thread(target=self._accept, args=(name, sock), daemon=True).start()
        self.stop = False

    def _accept(self, name, sock):
        while not getattr(self, "stop", False):
            try:
                connection, _ = sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.arrived.append(name)
            connection.close()

    def close(self):
        self.stop = True
        for _, sock in self.sockets:
            sock.close()


def processes_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture()
def arena(tmp_path_factory):
    """The attackers' targets: a world-writable shared directory (so only the sandbox stops
    writes, not file permissions), a secret file in it, a secret in our environment,
    listeners, and a victim process."""
    token = secrets.token_hex(6)
    shared = Path(tempfile.mkdtemp(prefix="thinkwise-redteam-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    shared.chmod(0o777)
    secret = f"SECRET-{secrets.token_hex(12)}"
    secret_file = shared / "secret.txt"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o644)
    listeners = Listeners(shared, token)
    context = {"shared": str(shared), "secret_file": str(secret_file), "port": listeners.port,
               "unix_path": listeners.unix_path, "abstract": listeners.abstract, "token": token,
               "sleep_token": f"99{int(token, 16) % 10**9}", "host_pid": os.getpid(), "victim_pid": 0}
    state = {"context": context, "shared": shared, "secret": secret, "listeners": listeners,
             "tmp_before": set(os.listdir("/tmp")), "shm_before": set(os.listdir("/dev/shm")),
             "hostname": socket.gethostname()}
    yield state
    listeners.close()
    for pid in processes_with(context["sleep_token"]):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(shared, ignore_errors=True)


def start_victim(user: int | None) -> subprocess.Popen:
    command = ["sleep", "60"]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def judge(state: dict, report: dict, victim: subprocess.Popen, received_signals: list) -> None:
    """The effects seen from outside, after every attack ran in both modes."""
    context, shared = state["context"], state["shared"]
    listeners = state["listeners"]
    time.sleep(0.3)  # let the accept threads see anything in flight
    # Files: nothing new in the shared directory, outside /var/tmp, our /tmp or /dev/shm.
    assert sorted(os.listdir(shared)) == ["listener.sock", "secret.txt"], os.listdir(shared)
    assert not os.path.exists(f"/var/tmp/pwned_{context['token']}")
    assert not os.path.exists("/sandbox-escaped") and not os.path.exists("/x-escaped")
    new_tmp = set(os.listdir("/tmp")) - state["tmp_before"]
    assert not [name for name in new_tmp if "escaped" in name or "pwned" in name], new_tmp
    new_shm = set(os.listdir("/dev/shm")) - state["shm_before"]
    assert not [name for name in new_shm if "thinkwise" in name], new_shm
    # Network: no connection arrived.
    assert listeners.arrived == []
    # Processes: no signal reached us, the victim lives, no daemon survived.
    assert received_signals == []
    assert victim.poll() is None, "the victim process was killed from inside the sandbox"
    deadline = time.monotonic() + 2
    while processes_with(context["sleep_token"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(context["sleep_token"]) == [], "a daemon outlived its run"
    assert socket.gethostname() == state["hostname"]
    for mode in ("audit", "kernel"):
        for name, result in report[mode].items():
            text = result["stdout"] + result["stderr"] + result["detail"]
            # Secrets: neither our environment's nor the file's.
            assert state["secret"] not in text, (mode, name)
            assert "THINKWISE_REDTEAM_SECRET" not in text, (mode, name)
            assert result["isolation"] == "bubblewrap"
            assert result["wall"] < 3 + 2.0, (mode, name, result["wall"])  # nothing outlives the timeout
    # The kernel-only runs really got the primitives the audit layer would have refused
    # (so the kernel was what stopped them), and the seccomp filter answered EPERM (1).
    kernel = report["kernel"]
    assert "process_vm_readv -1 1" in kernel["ctypes_read_parent_memory"]["stdout"], kernel["ctypes_read_parent_memory"]
    assert "ptrace -1 1" in kernel["ctypes_read_parent_memory"]["stdout"]
    for call in ("mount", "unshare", "keyctl", "bpf"):
        assert f"{call} -1 1" in kernel["sethostname_and_mount"]["stdout"], kernel["sethostname_and_mount"]
    assert "connect -1" in kernel["ctypes_socket"]["stdout"]
    assert "No space left" in kernel["fill_dev_shm"]["stdout"]
    # Honest checking: the always-equal object scores nothing.
    assert report["always_equal"] == [0.0, 0.0]


def test_attacks_are_contained_when_running_as_we_are(arena, monkeypatch):
    secret = arena["secret"]
    monkeypatch.setenv("THINKWISE_REDTEAM_SECRET", secret)
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append("SIGUSR1"))
    victim = start_victim(None)
    try:
        arena["context"]["victim_pid"] = victim.pid
        names = sorted(attacks.ATTACKS)
        report = {"audit": attacks.run_attacks(arena["context"], names, True),
                  "kernel": attacks.run_attacks(arena["context"], names, False),
                  "always_equal": [attacks.always_equal_score(True), attacks.always_equal_score(False)]}
        judge(arena, report, victim, received)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        victim.kill()
        victim.wait()


def unprivileged_python() -> str | None:
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        found = isolation.runtime_for(candidate, for_others=True) if os.path.exists(candidate) else None
        if found is not None:
            return found[0]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root (CI runs as root)")
def test_attacks_are_contained_when_running_as_an_unprivileged_user(arena, tmp_path):
    python = unprivileged_python()
    assert python is not None, "no system python3 an unprivileged uid can run (install python3)"
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop to an unprivileged uid"
    # The sandbox modules, this file and the seccomp binding, copied where nobody can read
    # them (our checkout and venv may sit under root-only directories); no torch needed.
    bundle = Path(tempfile.mkdtemp(prefix="thinkwise-redteam-code-"))
    try:
        tasks = bundle / "thinkwise" / "tasks"
        tasks.mkdir(parents=True)
        (bundle / "thinkwise" / "__init__.py").write_text("")
        (tasks / "__init__.py").write_text("")
        shutil.copy(PACKAGE / "errors.py", bundle / "thinkwise")
        for name in ("sandbox.py", "sandbox_child.py", "isolation.py", "code_checks.py", "extraction.py"):
            shutil.copy(PACKAGE / "tasks" / name, tasks)
        # extraction.py reads only a reply's answer part (the reasoning parser, which needs nothing else).
        shutil.copytree(PACKAGE / "reasoning", bundle / "thinkwise" / "reasoning",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(HERE / "attacks.py", bundle)
        seccomp_binding = isolation._seccomp_module()
        if seccomp_binding is not None and seccomp_binding.__file__.endswith(".py"):
            shutil.copy(seccomp_binding.__file__, bundle)
        for path in [bundle, *bundle.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        victim = start_victim(NOBODY)
        arena["context"]["victim_pid"] = victim.pid
        try:
            job = json.dumps({"context": arena["context"], "names": sorted(attacks.ATTACKS)})
            run = subprocess.run(
                ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-E", "-S", "-B",
                 str(bundle / "attacks.py")],
                input=job, capture_output=True, text=True, timeout=120, cwd=str(bundle),
                env={"THINKWISE_REDTEAM_SECRET": arena["secret"], "PATH": "/usr/bin:/bin"},
            )
            # Run by path, attacks.py puts the bundle first on sys.path, so its copies are used.
            assert run.returncode == 0, run.stderr[-3000:]
            report = json.loads(run.stdout.strip().splitlines()[-1])
            judge(arena, report, victim, report["signals"])
        finally:
            victim.kill()
            victim.wait()
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
