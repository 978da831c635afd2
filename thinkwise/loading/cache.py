"""The on-disk cache shared by every loader, and the atomic-write helpers it relies on.

Everything thinkwise derives from a model file (the assembled default GGUF, a GGUF's
rebuilt tokenizer, dequantized weights) lives under one directory: the `cache_dir`
argument, else `$THINKWISE_CACHE`, else `~/.cache/thinkwise`. Entries are keyed by the
identity of the file they came from, so editing or replacing that file simply misses the
cache instead of serving stale data. Every write goes to a temporary name in the same
directory first and is renamed into place only once complete, so a crash or a concurrent
loader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory (created if needed): argument, $THINKWISE_CACHE, ~/.cache/thinkwise."""
    if cache_dir is None:
        cache_dir = os.environ.get("THINKWISE_CACHE") or Path.home() / ".cache" / "thinkwise"
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_identity(path: Path) -> str:
    """A cheap key for a file's current contents: resolved path, size and mtime (ns).

    Hashing a multi-hundred-megabyte file on every load would cost seconds; any rewrite of
    the file changes its mtime or size, which is what we need to invalidate derived data.
    """
    stat = path.stat()
    text = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def atomic_path(final: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write; rename it onto `final` on success.

    The temporary lives in the same directory so the rename is atomic (same filesystem).
    On any exception it is removed, leaving `final` untouched (absent or the old version).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp create owner-only entries; a cache is fine to share read-only.
        os.chmod(tmp, 0o755 if is_dir else 0o644)
        if is_dir:
            if final.exists():
                # Another process may have finished the same entry first; theirs is as good.
                shutil.rmtree(tmp, ignore_errors=True)
                return
            os.replace(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
