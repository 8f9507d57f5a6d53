"""Files that decode to wrong or unwritable data are refused on load, each with a reason that names the tag.

And valid character sets, ISO 2022 code extensions included, give outputs that validate.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_encoder
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless

from liverfat.analysis import AnalysisOptions, not_analysed
from liverfat.dicom_io.outputs import write_not_applicable_sr, write_outputs
from liverfat.dicom_io.read import discover, load_series
from liverfat.dicom_io.series import CTSeries
from liverfat.errors import Finding, LiverfatError, Reason
from tests.dicom_io.output_cases import (
    SMALL_GRID,
    dciodvfy_available,
    dciodvfy_errors,
    ds_points,
    make_result,
)
from tests.phantom import Grid, Phantom, write_series

GRID = Grid(rows=48, columns=48, pixel_spacing_mm=7.0, slice_positions_mm=tuple(np.arange(-40.0, 40.1, 5.0)))
LIDC_SLICES = "lidc-idri-partial/LIDC-IDRI-0002_noCBA_12sl"  # real GE slices, 512 x 512, explicit VR


def load_one(folder: Path) -> CTSeries:
    (series,) = discover([folder]).series
    return load_series(series)


def load_error(folder: Path) -> LiverfatError:
    with pytest.raises(LiverfatError) as caught:
        load_one(folder)
    return caught.value


def rewrite(paths: list[Path], change: Callable[[Dataset], None]) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


def patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    """Replace one exact byte run in a file: values pydicom refuses to write (NaN, an unknown VR)."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def phantom_files(folder: Path, grid: Grid = GRID) -> list[Path]:
    return write_series(folder, Phantom(noise_sd_hu=0.0), grid)


# ---------------------------------------------------------------------------------------
# headers: each refusal names the tag, what was seen and what was expected


def test_a_missing_study_instance_uid_is_a_missing_attribute(tmp_path: Path) -> None:
    paths = phantom_files(tmp_path)
    rewrite(paths[4:5], lambda ds: delattr(ds, "StudyInstanceUID"))

    error = load_error(tmp_path)

    assert error.reason == Reason.MISSING_ATTRIBUTE
    assert "(0020,000D) 'Study Instance UID' is absent; expected a UID" in error.message
    assert paths[4].name in error.message


def test_a_nan_rescale_slope_is_refused_before_it_reaches_the_writers(tmp_path: Path) -> None:
    paths = phantom_files(tmp_path)
    rewrite(paths[2:3], lambda ds: setattr(ds, "RescaleSlope", "1.00"))
    patch_bytes(paths[2], b"\x28\x00\x53\x10DS\x04\x001.00", b"\x28\x00\x53\x10DS\x04\x00NaN ")

    error = load_error(tmp_path)

    assert error.reason == Reason.INVALID_ATTRIBUTE
    assert "(0028,1053) 'Rescale Slope' is NaN, expected a finite number" in error.message


def test_a_value_that_only_the_last_file_holds_is_checked_after_the_same_element_passed_in_the_others(
    tmp_path: Path,
) -> None:
    # The check remembers the elements that passed (same bytes, same context) across the series' files.
    paths = phantom_files(tmp_path)
    rewrite(paths, lambda ds: setattr(ds, "ReconstructionDiameter", "360.0"))
    patch_bytes(paths[-1], b"\x18\x00\x00\x11DS\x06\x00360.0 ", b"\x18\x00\x00\x11DS\x06\x00NaN   ")

    error = load_error(tmp_path)

    assert error.reason == Reason.INVALID_ATTRIBUTE
    assert "(0018,1100) 'Reconstruction Diameter' is NaN, expected a finite number" in error.message
    assert paths[-1].name in error.message


def test_an_element_with_an_unknown_value_representation_is_named(tmp_path: Path) -> None:
    paths = phantom_files(tmp_path)
    rewrite(paths[:1], lambda ds: setattr(ds, "StudyDescription", "CHEST WO"))
    patch_bytes(paths[0], b"\x08\x00\x30\x10LO\x08\x00CHEST WO", b"\x08\x00\x30\x10ZZ\x08\x00CHEST WO")

    error = load_error(tmp_path)

    assert error.reason == Reason.INVALID_ATTRIBUTE
    assert "(0008,1030) 'Study Description' has value representation 'ZZ'" in error.message


def test_an_unknown_character_set_is_refused(tmp_path: Path) -> None:
    paths = phantom_files(tmp_path)
    rewrite(paths, lambda ds: setattr(ds, "SpecificCharacterSet", "ISO_IR 999"))

    error = load_error(tmp_path)

    assert error.reason == Reason.INVALID_ATTRIBUTE
    assert "(0008,0005) 'Specific Character Set' names 'ISO_IR 999'" in error.message


def test_a_matrix_larger_than_any_ct_is_refused_before_memory_is_allocated(tmp_path: Path) -> None:
    paths = phantom_files(tmp_path)

    def huge(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 65535
        ds.PixelData = bytes(8192)

    rewrite(paths, huge)

    error = load_error(tmp_path)  # without the check: MemoryError for a 650 GiB volume

    assert error.reason == Reason.INVALID_ATTRIBUTE
    assert "(0028,0010) 'Rows' is 65535; expected a whole number from 1 to 4096" in error.message


def test_a_volume_too_large_to_allocate_is_refused_before_decoding(tmp_path: Path) -> None:
    positions = tuple(float(p) for p in np.arange(0.0, 257 * 2.5, 2.5))  # 257 x 4096 x 4096 x 4 bytes: 16.1 GiB
    paths = phantom_files(tmp_path, replace(GRID, rows=8, columns=8, slice_positions_mm=positions))

    def large(ds: Dataset) -> None:
        ds.Rows = ds.Columns = 4096
        ds.PixelData = bytes(8192)

    rewrite(paths, large)

    error = load_error(tmp_path)

    assert error.reason == Reason.VOLUME_TOO_LARGE
    assert "257 slices of (0028,0010) 'Rows' 4096 x (0028,0011) 'Columns' 4096 need 16.1 GiB" in error.message
    assert "expected at most 16 GiB" in error.message


@pytest.mark.parametrize(
    ("photometric", "samples"), [("PALETTE COLOR", 1), ("RGB", 3)], ids=["palette_without_lut", "rgb"]
)
def test_colour_images_are_not_ct(tmp_path: Path, photometric: str, samples: int) -> None:
    paths = phantom_files(tmp_path)

    def colour(ds: Dataset) -> None:
        ds.PhotometricInterpretation, ds.SamplesPerPixel = photometric, samples

    rewrite(paths, colour)

    error = load_error(tmp_path)

    assert error.reason == Reason.NOT_CT
    assert f"(0028,0004) 'Photometric Interpretation' is '{photometric}'" in error.message
    assert "expected MONOCHROME1 or MONOCHROME2 with 1 sample" in error.message


def test_monochrome1_ct_gives_the_same_hounsfield_units(tmp_path: Path) -> None:
    phantom_files(tmp_path / "a")
    plain = load_one(tmp_path / "a").volume.array
    paths = phantom_files(tmp_path / "b")
    rewrite(paths, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))

    assert np.array_equal(load_one(tmp_path / "b").volume.array, plain)  # the Modality LUT ignores display polarity


# ---------------------------------------------------------------------------------------
# compressed pixel data: a cut codestream is refused, not graded


def compressed_lidc_copy(shared_data: Path, folder: Path, syntax: UID) -> list[Path]:
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no pydicom encoder plugin for {syntax.name}")
    folder.mkdir()
    paths = [Path(shutil.copy(path, folder)) for path in sorted((shared_data / LIDC_SLICES).iterdir())]
    rewrite(paths, lambda ds: ds.compress(syntax))
    return paths


def cut_frame_in_half(ds: Dataset) -> None:
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])


def test_a_jpeg_ls_frame_cut_in_half_decodes_silently_in_pydicom_but_is_refused(
    shared_data: Path, tmp_path: Path
) -> None:
    paths = compressed_lidc_copy(shared_data, tmp_path / "ct", JPEGLSLossless)
    intact = pydicom.dcmread(paths[5]).pixel_array
    rewrite(paths[5:6], cut_frame_in_half)
    cut = pydicom.dcmread(paths[5]).pixel_array  # no error from the decoder: the danger
    assert (cut != intact).any(axis=1).sum() > 100

    error = load_error(tmp_path / "ct")

    assert error.reason == Reason.DECODE_FAILED
    assert paths[5].name in error.message and JPEGLSLossless.name in error.message
    assert "expected the end marker FF D9 (truncated or corrupt compressed data)" in error.message


def test_a_cut_jpeg_2000_frame_is_refused_by_its_end_marker(shared_data: Path, tmp_path: Path) -> None:
    paths = compressed_lidc_copy(shared_data, tmp_path / "ct", JPEG2000Lossless)
    rewrite(paths[-1:], cut_frame_in_half)

    error = load_error(tmp_path / "ct")

    assert error.reason == Reason.DECODE_FAILED and "expected the end marker FF D9" in error.message


def test_two_frames_in_a_single_frame_image_are_refused(shared_data: Path, tmp_path: Path) -> None:
    paths = compressed_lidc_copy(shared_data, tmp_path / "ct", JPEGLSLossless)

    def two_frames(ds: Dataset) -> None:
        (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
        ds.PixelData = encapsulate([frame, frame], has_bot=True)

    rewrite(paths[:1], two_frames)

    error = load_error(tmp_path / "ct")

    assert error.reason == Reason.DECODE_FAILED
    assert "holds 2 frames in its Basic Offset Table; expected 1" in error.message


def test_pixel_data_that_is_not_encapsulated_is_a_decode_failure(shared_data: Path, tmp_path: Path) -> None:
    paths = compressed_lidc_copy(shared_data, tmp_path / "ct", JPEGLSLossless)

    def break_items(ds: Dataset) -> None:  # an empty offset table item, then no item tag before the fragment
        ds.PixelData = ds.PixelData[:8] + bytes(8) + ds.PixelData[16:]

    rewrite(paths[3:4], break_items)

    error = load_error(tmp_path / "ct")

    assert error.reason == Reason.DECODE_FAILED and paths[3].name in error.message
    assert "is not encapsulated as JPEG-LS Lossless Image Compression requires" in error.message


def test_whole_compressed_real_slices_still_load(shared_data: Path, tmp_path: Path) -> None:
    paths = compressed_lidc_copy(shared_data, tmp_path / "ct", JPEGLSLossless)

    ct = load_one(tmp_path / "ct")

    assert ct.volume.array.shape == (len(paths), 512, 512)
    assert np.array_equal(ct.volume.array, load_one(shared_data / LIDC_SLICES).volume.array)


# ---------------------------------------------------------------------------------------
# character sets: valid ones give valid outputs

CHARACTER_SETS = {
    # PS3.5 H.3.1: Japanese in Kanji and Hiragana, value 1 empty (ISO 2022 IR 6)
    "japanese_iso_2022_ir_87": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    # PS3.5 I.2: Korean, which highdicom cannot declare: written as UTF-8, same characters
    "korean_iso_2022_ir_149": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    "latin1_with_code_extensions": ("ISO 2022 IR 100", "Müller^Jürgen"),
    "default_repertoire_declared_empty": ("", "DOE^JANE"),
}


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("name", list(CHARACTER_SETS))
def test_valid_character_sets_give_outputs_without_dciodvfy_errors(tmp_path: Path, name: str) -> None:
    character_set, patient_name = CHARACTER_SETS[name]
    phantom = Phantom()
    paths = write_series(tmp_path / "ct", phantom, replace(SMALL_GRID, rows=96, columns=96, pixel_spacing_mm=3.6))

    def encode(ds: Dataset) -> None:
        ds.SpecificCharacterSet = character_set
        ds.PatientName = patient_name

    rewrite(paths, encode)
    series = load_one(tmp_path / "ct")
    liver = phantom.liver_at(np.stack([ds_points(ds) for ds in series.datasets]))

    written = [w.path for w in write_outputs(series, make_result(series, liver), tmp_path / "out")]

    assert [path.name for path in written] == ["seg.dcm", "sr.dcm", "sr-summary.dcm", "keyimage.dcm"]
    for path in written:
        assert dciodvfy_errors(path) == [], path.name
        assert str(pydicom.dcmread(path, stop_before_pixels=True).PatientName) == patient_name, path.name


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_a_rejected_japanese_series_gets_a_valid_not_applicable_sr_from_its_headers(tmp_path: Path) -> None:
    character_set, patient_name = CHARACTER_SETS["japanese_iso_2022_ir_87"]

    def encode(ds: Dataset) -> None:
        ds.SpecificCharacterSet = character_set
        ds.PatientName = patient_name

    rewrite(phantom_files(tmp_path / "ct"), encode)
    (files,) = discover([tmp_path / "ct"]).series
    reason = Finding(Reason.CONTRAST, "(0018,0010) 'Contrast/Bolus Agent' is 'IV'")
    result = not_analysed(files.series_uid, str(files.headers[0].StudyInstanceUID), (reason,), AnalysisOptions(tmp_path))

    path = write_not_applicable_sr(files, result, tmp_path / "out").path

    assert dciodvfy_errors(path) == []
    assert str(pydicom.dcmread(path).PatientName) == patient_name
