"""Durable writes: the target appears whole or not at all, and no temporary file is left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from liverfat.files import durable_path, durable_write


def test_durable_write_makes_missing_folders_and_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "results" / "7" / "1.2.3" / "result.json"
    durable_write(target, b"{}\n")
    durable_write(target, b'{"again": true}\n')
    assert target.read_bytes() == b'{"again": true}\n'
    assert list(target.parent.iterdir()) == [target]


def test_durable_path_gives_a_writer_the_target_suffix_and_renames_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out" / "liver_mask.nii.gz"
    with durable_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".liver_mask.nii.gz") and tmp != target
        tmp.write_bytes(b"mask")
    assert target.read_bytes() == b"mask"
    assert list(target.parent.iterdir()) == [target]


def test_durable_path_leaves_the_old_target_when_the_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "liver_mask.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), durable_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]
