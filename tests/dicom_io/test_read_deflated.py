"""Deflated Explicit VR Little Endian files (PS3.5 Section A.5): discovered, checked for truncation, loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from liverfat.dicom_io.read import discover, load_series
from liverfat.errors import Reason
from tests.phantom import Grid, Phantom, write_series

GRID = Grid(rows=48, columns=48, pixel_spacing_mm=7.0, slice_positions_mm=(-5.0, 0.0, 5.0, 10.0))


def deflate(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    deflated = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(folder / path.name, enforce_file_format=True)
        deflated.append(folder / path.name)
    return deflated


def test_a_deflated_series_loads_to_the_same_hu_as_its_uncompressed_original(tmp_path: Path) -> None:
    plain = write_series(tmp_path / "plain", Phantom(), GRID)
    deflated = deflate(plain, tmp_path / "deflated")
    assert deflated[0].stat().st_size < pydicom.dcmread(deflated[0]).PixelData.__len__()  # compressed: smaller
    found = discover([tmp_path / "deflated"])
    assert found.skipped == () and len(found.series) == 1
    original = load_series(discover([tmp_path / "plain"]).series[0])
    loaded = load_series(found.series[0])
    np.testing.assert_array_equal(loaded.volume.array, original.volume.array)


def test_a_truncated_deflated_file_is_skipped_as_not_readable(tmp_path: Path) -> None:
    [path, *_] = deflate(write_series(tmp_path / "plain", Phantom(), GRID), tmp_path / "deflated")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    [skipped] = discover([path]).skipped
    assert skipped.finding.code is Reason.NOT_READABLE
