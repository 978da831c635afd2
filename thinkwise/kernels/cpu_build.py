"""Building our C++ CPU operators on first use (cpu_quant_gemm, cpu_decode_ops).

Each operator library is one source file under csrc/, compiled by `torch.utils.cpp_extension`
(ninja and the system's C++ compiler) into ~/.cache/thinkwise/torch_extensions, in a directory
keyed by the source's hash, the compiler flags, the torch version and, since the sources may be compiled for the
building machine's own instruction set (-march=native), the CPU's feature flags. `build`
never raises: a missing compiler, a CPU without the needed features, a failed build or the
library's disable variable set to 0 each give {"available": False, "reason": ...}, and the
callers fall back to PyTorch (the twins) and say so in the run metadata. `LibraryVariants`
picks, among builds of one source for several instruction sets, the best this CPU runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_dir(library: str, source: Path, cflags: list[str] = ()) -> Path:
    from thinkwise.loading.cache import cache_root

    key = (source.read_bytes() + torch.__version__.encode() + " ".join(sorted(cpu_flags())).encode()
           + " ".join(cflags).encode())
    return cache_root() / "torch_extensions" / f"{library}-{hashlib.sha256(key).hexdigest()[:16]}"


def build(library: str, source: Path, cflags: list[str], required_flags: tuple[str, ...] = (),
          disable_env: str | None = None) -> dict:
    """Compile and load `source` (which registers its operators with TORCH_LIBRARY);
    {"available": bool, "reason": where it was built, or why it is not available}."""
    if disable_env and os.environ.get(disable_env, "1") == "0":
        return {"available": False, "reason": f"disabled by {disable_env}=0"}
    missing = [flag for flag in required_flags if flag not in cpu_flags()]
    if missing:
        return {"available": False, "reason": f"this CPU lacks {', '.join(missing)}"}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return {"available": False, "reason": f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"}
    try:
        from torch.utils.cpp_extension import load

        directory = build_dir(library, source, cflags)
        directory.mkdir(parents=True, exist_ok=True)
        load(name=f"thinkwise_{library}", sources=[str(source)], extra_cflags=cflags,
             extra_ldflags=["-pthread"] + [flag for flag in cflags if flag == "-fopenmp"],
             build_directory=str(directory), is_python_module=False, verbose=False)
    except Exception as exc:  # a broken toolchain must not stop the engine: fall back, say why
        logger.warning("the CPU operators in %s could not be built (%s); using PyTorch's", source.name, exc)
        return {"available": False, "reason": f"build failed: {str(exc).strip().splitlines()[-1][:300]}"}
    return {"available": True, "reason": f"built in {directory}"}


class _BuiltOnce:
    """`status()` runs `load()` on first call (once, thread-safe) and remembers the answer;
    `load()` itself builds without remembering (tests)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._status: dict | None = None

    def load(self) -> dict:
        raise NotImplementedError

    def status(self) -> dict:
        status = self._status
        if status is not None:  # the hot path (~240 calls a decode step): no lock once settled
            return status
        with self._lock:
            if self._status is None:
                self._status = self.load()
            return self._status

    def available(self) -> bool:
        return self.status()["available"]


class CppLibrary(_BuiltOnce):
    """One operator library, built from one source with one set of flags."""

    def __init__(self, library: str, source: Path, cflags: list[str], required_flags: tuple[str, ...] = (),
                 disable_env: str | None = None):
        super().__init__()
        self.library, self.source, self.cflags = library, source, cflags
        self.required_flags, self.disable_env = required_flags, disable_env

    def load(self) -> dict:
        return build(self.library, self.source, self.cflags, self.required_flags, self.disable_env)


class LibraryVariants(_BuiltOnce):
    """Builds of one source for several instruction sets, best first (say AVX-512 VNNI, then
    AVX2): `status()` is the first that builds and loads here, with its name under "isa" and
    the operator namespace it registers under "namespace"; otherwise every variant's reason.
    The disable variable set to 0 turns all off; set to a variant's name, it forces that one
    (A/B runs of the slower build on a CPU that has both)."""

    def __init__(self, variants: list[tuple[str, str, CppLibrary]], disable_env: str):
        super().__init__()
        self.variants, self.disable_env = variants, disable_env

    def load(self) -> dict:
        wanted = os.environ.get(self.disable_env, "1")
        if wanted == "0":
            return {"available": False, "reason": f"disabled by {self.disable_env}=0"}
        names = [isa for isa, _, _ in self.variants]
        if wanted in names:
            chosen = [variant for variant in self.variants if variant[0] == wanted]
        elif wanted == "1":
            chosen = self.variants
        else:  # a typo must not pass unseen: the run goes on with PyTorch's kernels, and says so
            reason = f"{self.disable_env}={wanted!r} is none of 0, 1, {', '.join(names)}"
            logger.warning("%s; using PyTorch's kernels", reason)
            return {"available": False, "reason": reason}
        reasons = []
        for isa, namespace, library in chosen:
            status = library.load()
            if status["available"]:
                return {**status, "isa": isa, "namespace": namespace}
            reasons.append(f"{isa}: {status['reason']}")
        return {"available": False, "reason": "; ".join(reasons)}
