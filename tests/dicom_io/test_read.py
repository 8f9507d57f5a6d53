"""Reading CT series: discovery (and the files of a known series), slice order and geometry, decoding, and every rejection."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
    generate_uid,
)

from liverfat.dicom_io.read import decode_hu, discover, load_series, read_series
from liverfat.dicom_io.series import CTSeries
from liverfat.errors import LiverfatError, Reason
from liverfat.volume import Volume
from tests.phantom import Grid, Phantom, SeriesHeader, write_series

# Small and coarse so every test writes its own series in a few milliseconds.
POSITIONS = tuple(float(p) for p in np.arange(-40.0, 40.1, 5.0))
GRID = Grid(rows=48, columns=48, pixel_spacing_mm=7.0, slice_positions_mm=POSITIONS)
EXACT = Phantom(noise_sd_hu=0.0)  # noise-free, so a voxel's value is a function of its position
LIVER_CENTRE = EXACT.liver.centre


def load_one(*inputs: Path) -> CTSeries:
    found = discover(list(inputs))
    assert len(found.series) == 1, found
    return load_series(found.series[0])


def load_error(*inputs: Path) -> LiverfatError:
    with pytest.raises(LiverfatError) as caught:
        load_one(*inputs)
    return caught.value


def voxel_positions(volume: Volume) -> np.ndarray:
    k, j, i = np.indices(volume.array.shape)
    return volume.to_lps(np.stack([i, j, k], axis=-1).astype(np.float64))


def matches_phantom(volume: Volume, phantom: Phantom = EXACT) -> float:
    """Fraction of voxels whose value is the phantom's value at the voxel's LPS position."""
    expected = phantom.hu_at(voxel_positions(volume))
    return float(np.mean(np.abs(volume.array - expected) < 0.5))


def rewrite(paths: list[Path], change: Callable[[Dataset], None]) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


# ---------------------------------------------------------------------------------------
# discovery


def test_discover_groups_files_by_series_uid_in_sorted_order(tmp_path: Path) -> None:
    first, second = SeriesHeader(series_uid="1.2.3.2"), SeriesHeader(series_uid="1.2.3.1")
    write_series(tmp_path / "a", EXACT, GRID, first)
    write_series(tmp_path / "b" / "nested", EXACT, GRID, second)

    found = discover([tmp_path])

    assert [s.series_uid for s in found.series] == ["1.2.3.1", "1.2.3.2"]
    for series in found.series:
        assert len(series.files) == len(POSITIONS)
        assert list(series.files) == sorted(series.files)
        assert [h.SOPInstanceUID for h in series.headers] == [pydicom.dcmread(f).SOPInstanceUID for f in series.files]
        assert all("PixelData" not in header for header in series.headers)
    assert found.skipped == () and found.nifti == ()


def test_discover_accepts_single_files_and_folders_mixed_without_counting_a_file_twice(tmp_path: Path) -> None:
    paths = write_series(tmp_path, EXACT, GRID)

    found = discover([paths[0], tmp_path, paths[1]])

    assert len(found.series) == 1 and len(found.series[0].files) == len(POSITIONS)


def test_discover_skips_files_that_are_not_dicom_with_reasons(tmp_path: Path) -> None:
    good = write_series(tmp_path / "ct", EXACT, GRID)
    (tmp_path / "notes.txt").write_text("not an image\n" * 20)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "screenshot.png")
    (tmp_path / "empty.dcm").write_bytes(b"")
    data = good[0].read_bytes()
    (tmp_path / "truncated_pixels.dcm").write_bytes(data[: len(data) - 500])
    (tmp_path / "truncated_header.dcm").write_bytes(data[:600])
    (tmp_path / "ct.nii.gz").write_bytes(b"")

    found = discover([tmp_path, tmp_path / "missing"])

    reasons = {s.path.name: s.finding.code for s in found.skipped}
    assert reasons == {
        "notes.txt": Reason.NOT_DICOM,
        "screenshot.png": Reason.NOT_DICOM,
        "empty.dcm": Reason.NOT_DICOM,
        "truncated_pixels.dcm": Reason.NOT_READABLE,
        "truncated_header.dcm": Reason.NOT_READABLE,
        "missing": Reason.NOT_FOUND,
    }
    assert "truncated" in {s.path.name: s for s in found.skipped}["truncated_pixels.dcm"].finding.message
    assert found.nifti == (tmp_path / "ct.nii.gz",)
    assert len(found.series) == 1 and len(found.series[0].files) == len(POSITIONS)


def test_discover_skips_non_image_objects_naming_their_sop_class(tmp_path: Path) -> None:
    write_series(tmp_path, EXACT, GRID)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = KeyObjectSelectionDocumentStorage
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ko = Dataset()
    ko.file_meta = meta
    ko.SOPClassUID, ko.SOPInstanceUID, ko.Modality = KeyObjectSelectionDocumentStorage, uid, "KO"
    ko.SeriesInstanceUID = generate_uid()
    ko.save_as(tmp_path / "key_objects.dcm", enforce_file_format=True)

    found = discover([tmp_path])

    (skipped,) = found.skipped
    assert skipped.finding.code == Reason.NOT_CT
    assert "Key Object Selection" in skipped.finding.message and "'KO'" in skipped.finding.message


def test_discover_reads_datasets_written_without_preamble(tmp_path: Path) -> None:
    paths = write_series(tmp_path, EXACT, GRID)
    reference = load_one(tmp_path).volume.array

    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert paths[0].read_bytes()[128:132] != b"DICM"

    assert np.array_equal(load_one(tmp_path).volume.array, reference)


def test_read_series_gives_the_known_series_as_discover_does_and_skips_the_rest_with_reasons(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "ct", EXACT, GRID, SeriesHeader(series_uid="1.2.3.1"))
    other = write_series(tmp_path / "other", EXACT, GRID, SeriesHeader(series_uid="1.2.3.2"))
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 200)

    found = read_series("1.2.3.1", [*reversed(paths), other[0], tmp_path / "broken.dcm", tmp_path / "gone.dcm"])

    (expected,) = discover([tmp_path / "ct"]).series
    (series,) = found.series
    assert (series.series_uid, series.files) == (expected.series_uid, expected.files)
    assert [h.SOPInstanceUID for h in series.headers] == [h.SOPInstanceUID for h in expected.headers]
    assert all("PixelData" not in header for header in series.headers)
    reasons = {s.path: s.finding.code for s in found.skipped}
    assert reasons == {other[0]: Reason.INVALID_ATTRIBUTE, tmp_path / "broken.dcm": Reason.NOT_DICOM,
                       tmp_path / "gone.dcm": Reason.NOT_FOUND}  # fmt: skip
    assert "'1.2.3.2'; expected '1.2.3.1'" in {s.path: s for s in found.skipped}[other[0]].finding.message


def test_read_series_of_no_readable_instance_is_no_series(tmp_path: Path) -> None:
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 200)

    found = read_series("1.2.3.1", [tmp_path / "broken.dcm"])

    assert found.series == () and [s.finding.code for s in found.skipped] == [Reason.NOT_DICOM]


# ---------------------------------------------------------------------------------------
# slice order and geometry

ORIENTATIONS = {
    "head_first": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), "HFS"),
    "feet_first": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0), "FFS"),
    "rows_flipped": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), "HFS"),
    "both_flipped": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), "FFP"),
    "rotated_in_plane": ((np.cos(0.5), np.sin(0.5), 0.0), (-np.sin(0.5), np.cos(0.5), 0.0), "HFS"),
}


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_same_anatomy_lands_at_the_same_lps_position_whatever_the_storage_order(tmp_path: Path, name: str) -> None:
    row, column, position = ORIENTATIONS[name]
    grid = replace(GRID, row_direction=row, column_direction=column, slice_positions_mm=POSITIONS[::-1])
    write_series(tmp_path, EXACT, grid, SeriesHeader(patient_position=position), shuffle_instance_numbers=True)

    volume = load_one(tmp_path).volume

    assert matches_phantom(volume) > 0.999
    i, j, k = np.round(volume.to_index(LIVER_CENTRE)).astype(int)
    assert volume.array[k, j, i] == pytest.approx(EXACT.liver.hu)
    assert volume.spacing == pytest.approx((7.0, 7.0, 5.0))
    assert np.allclose(volume.direction[:, :2], np.column_stack([row, column]))
    assert np.linalg.det(volume.direction) == pytest.approx(1.0)  # k runs along row x column


def test_slices_are_ordered_by_position_not_by_instance_number_or_file_name(tmp_path: Path) -> None:
    write_series(tmp_path, EXACT, GRID, shuffle_instance_numbers=True)

    ct = load_one(tmp_path)

    positions = [float(ds.ImagePositionPatient[2]) for ds in ct.datasets]
    assert positions == sorted(positions)
    assert [int(ds.InstanceNumber) for ds in ct.datasets] != sorted(int(ds.InstanceNumber) for ds in ct.datasets)
    for k, ds in enumerate(ct.datasets):  # array[k] comes from datasets[k]
        assert np.allclose(ct.volume.to_lps((0, 0, k)), [float(v) for v in ds.ImagePositionPatient], atol=1e-3)
        assert np.array_equal(ct.volume.array[k], decode_hu(ds))
    assert [Path(p).name for p in ct.source_files] == [Path(ds.filename).name for ds in ct.datasets]


def test_series_metadata_comes_from_the_headers(tmp_path: Path) -> None:
    header = SeriesHeader()
    write_series(tmp_path, EXACT, GRID, header)

    ct = load_one(tmp_path)

    assert ct.series_uid == header.series_uid and ct.study_uid == header.study_uid
    assert ct.volume.array.dtype == np.float32 and ct.warnings == ()


def test_pixel_spacing_is_read_as_row_spacing_then_column_spacing(tmp_path: Path) -> None:
    paths = write_series(tmp_path, EXACT, GRID)
    rewrite(paths, lambda ds: setattr(ds, "PixelSpacing", [7.0, 3.5]))  # (0028,0030): between rows, between columns

    volume = load_one(tmp_path).volume

    assert volume.spacing == pytest.approx((3.5, 7.0, 5.0))  # (i, j, k): along a row, down a column, across slices


def test_rescale_slope_and_intercept_give_hounsfield_units(tmp_path: Path) -> None:
    (path,) = write_series(tmp_path, EXACT, replace(GRID, slice_positions_mm=(0.0,)))
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float32)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -3000

    assert np.array_equal(decode_hu(ds), stored * 2 - 3000)


# ---------------------------------------------------------------------------------------
# compressed transfer syntaxes


def compress_with_pydicom(paths: list[Path], syntax: UID) -> None:
    encoder = get_encoder(syntax)
    if not encoder.is_available:
        pytest.skip(f"no pydicom encoder plugin for {syntax.name}")
    rewrite(paths, lambda ds: ds.compress(syntax))


def compress_with_gdcm(paths: list[Path], syntax: UID) -> None:
    gdcm = pytest.importorskip("gdcm", reason=f"python-gdcm writes {syntax.name}; pydicom cannot")
    for path in paths:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()


@pytest.mark.parametrize(
    ("syntax", "compress"),
    [
        (RLELossless, compress_with_pydicom),
        (JPEGLSLossless, compress_with_pydicom),
        (JPEG2000Lossless, compress_with_pydicom),
        (JPEGLosslessSV1, compress_with_gdcm),
    ],
    ids=["rle", "jpeg_ls", "jpeg2000", "jpeg_lossless"],
)
def test_compressed_series_decode_to_the_same_hu_as_uncompressed(
    tmp_path: Path, syntax: UID, compress: Callable[[list[Path], UID], None]
) -> None:
    header = SeriesHeader()
    write_series(tmp_path / "plain", Phantom(), GRID, header)
    compressed = write_series(tmp_path / "compressed", Phantom(), GRID, replace(header, series_uid=generate_uid()))
    compress(compressed, syntax)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == syntax

    plain, packed = load_one(tmp_path / "plain").volume, load_one(tmp_path / "compressed").volume

    assert np.array_equal(plain.array, packed.array)
    assert plain.same_grid(packed)


def test_undecodable_pixel_data_is_a_decode_failure(tmp_path: Path) -> None:
    paths = write_series(tmp_path, EXACT, GRID)
    compress_with_pydicom(paths[:1], JPEG2000Lossless)

    def garble(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData[:40] + bytes(len(ds.PixelData) - 40)

    rewrite(paths[:1], garble)

    error = load_error(tmp_path)
    assert error.reason == Reason.DECODE_FAILED
    assert JPEG2000Lossless.name in error.message and paths[0].name in error.message


# ---------------------------------------------------------------------------------------
# duplicates


def test_exact_duplicate_instances_are_dropped_silently(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "a", EXACT, GRID)
    (tmp_path / "b").mkdir()
    shutil.copy(paths[3], tmp_path / "b" / "copy.dcm")

    ct = load_one(tmp_path)

    assert ct.volume.array.shape[0] == len(POSITIONS) and ct.warnings == ()


def test_other_instance_with_identical_pixels_at_a_taken_position_is_left_out_with_a_warning(tmp_path: Path) -> None:
    paths = write_series(tmp_path, EXACT, GRID)
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "resent.dcm")

    ct = load_one(tmp_path)

    assert ct.volume.array.shape[0] == len(POSITIONS)
    assert [w.code for w in ct.warnings] == [Reason.DUPLICATE_POSITIONS]
    assert matches_phantom(ct.volume) > 0.999


def test_different_pixels_at_the_same_position_are_rejected(tmp_path: Path) -> None:
    header = SeriesHeader()
    write_series(tmp_path / "a", EXACT, GRID, header)
    write_series(tmp_path / "b", EXACT.with_liver_hu(20.0), replace(GRID, slice_positions_mm=(0.0,)), header)

    error = load_error(tmp_path)

    assert error.reason == Reason.DUPLICATE_POSITIONS
    assert "differ" in error.message and "35.0 HU" in error.message


# ---------------------------------------------------------------------------------------
# spacing


def test_small_jitter_in_slice_positions_is_accepted(tmp_path: Path) -> None:
    jitter = np.random.default_rng(1).uniform(-0.2, 0.2, len(POSITIONS))  # up to 8% of the 5 mm step
    write_series(tmp_path, EXACT, replace(GRID, slice_positions_mm=tuple(np.asarray(POSITIONS) + jitter)))

    volume = load_one(tmp_path).volume

    assert volume.array.shape[0] == len(POSITIONS)
    assert volume.spacing[2] == pytest.approx(5.0, abs=0.05)


def test_a_missing_slice_is_rejected_with_the_positions_and_expected_step(tmp_path: Path) -> None:
    positions = POSITIONS[:6] + POSITIONS[7:]
    write_series(tmp_path, EXACT, replace(GRID, slice_positions_mm=positions))

    error = load_error(tmp_path)

    assert error.reason == Reason.UNEVEN_SPACING
    assert "10.00 mm between -15.00 and -5.00 mm" in error.message and "median step 5.00 mm" in error.message


def test_uneven_steps_beyond_the_tolerance_are_rejected(tmp_path: Path) -> None:
    positions = tuple(np.cumsum([0.0] + [4.0, 6.0] * 6))
    write_series(tmp_path, EXACT, replace(GRID, slice_positions_mm=positions))

    assert load_error(tmp_path).reason == Reason.UNEVEN_SPACING


# ---------------------------------------------------------------------------------------
# gantry tilt


def write_tilted_series(folder: Path, phantom: Phantom, tilt_deg: float, z_mm: tuple[float, ...]) -> None:
    """Images tilted about the L axis, stacked along the table (S) as a tilted gantry acquires them."""
    tilt = np.radians(tilt_deg)
    header = SeriesHeader()
    for n, z in enumerate(z_mm):
        grid = replace(GRID, column_direction=(0.0, np.cos(tilt), np.sin(tilt)), centre=(0.0, 0.0, z))
        (path,) = write_series(folder / "tmp", phantom, replace(grid, slice_positions_mm=(0.0,)), header)
        path.rename(folder / f"slice_{n:04d}.dcm")
    (folder / "tmp").rmdir()
    rewrite(sorted(folder.iterdir()), lambda ds: setattr(ds, "GantryDetectorTilt", tilt_deg))


def test_gantry_tilt_is_kept_exactly_on_a_sheared_grid_with_a_warning(tmp_path: Path) -> None:
    write_tilted_series(tmp_path, EXACT, 15.0, POSITIONS)

    ct = load_one(tmp_path)

    assert [w.code for w in ct.warnings] == [Reason.GANTRY_TILT] and "15.00 deg" in ct.warnings[0].message
    assert np.allclose(ct.volume.direction[:, 2], (0.0, 0.0, 1.0))  # stacking along the table
    assert ct.volume.spacing[2] == pytest.approx(5.0)
    assert matches_phantom(ct.volume) > 0.999


def test_simpleitk_resamples_the_sheared_grid_onto_an_axial_grid_correctly(tmp_path: Path) -> None:
    write_tilted_series(tmp_path, EXACT, 20.0, POSITIONS)
    sheared = load_one(tmp_path).volume
    axial = Volume(np.zeros((9, 30, 30), dtype=np.float32), (5.0, 5.0, 5.0), (-75.0, -75.0, -20.0))

    resampled = sitk.Resample(sheared.to_sitk(), axial.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, -2000.0)

    assert matches_phantom(axial.with_array(sitk.GetArrayFromImage(resampled))) > 0.95  # nearest: edge voxels differ


def test_a_tilt_tag_without_sheared_positions_only_warns(tmp_path: Path) -> None:
    paths = write_series(tmp_path, EXACT, GRID)
    rewrite(paths, lambda ds: setattr(ds, "GantryDetectorTilt", 12.0))

    ct = load_one(tmp_path)

    assert [w.code for w in ct.warnings] == [Reason.GANTRY_TILT]
    assert "stack along their normal" in ct.warnings[0].message
    assert np.allclose(ct.volume.direction, np.eye(3))


def test_slices_off_the_stacking_line_are_rejected(tmp_path: Path) -> None:
    header = SeriesHeader()
    write_series(tmp_path / "a", EXACT, replace(GRID, slice_positions_mm=POSITIONS[:8]), header)
    shifted = replace(GRID, slice_positions_mm=POSITIONS[8:], centre=(30.0, 0.0, 0.0))
    write_series(tmp_path / "b", EXACT, shifted, header)

    error = load_error(tmp_path)

    assert error.reason == Reason.GANTRY_TILT and "off the line" in error.message


# ---------------------------------------------------------------------------------------
# inconsistent series


@pytest.mark.parametrize(
    ("other", "named"),
    [
        (replace(GRID, rows=40), "Rows (0028,0010) x Columns (0028,0011)"),
        (replace(GRID, pixel_spacing_mm=6.0), "Pixel Spacing"),
        (replace(GRID, row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, 0.0, -1.0)), "not parallel"),
    ],
    ids=["rows", "pixel_spacing", "orientation"],
)
def test_slices_of_different_size_spacing_or_orientation_are_rejected(tmp_path: Path, other: Grid, named: str) -> None:
    header = SeriesHeader()
    write_series(tmp_path / "a", EXACT, GRID, header)
    write_series(tmp_path / "b", EXACT, replace(other, slice_positions_mm=(100.0, 105.0)), header)

    error = load_error(tmp_path)

    assert error.reason == Reason.MIXED_SIZES and named in error.message


def test_localizer_images_are_rejected_as_localizers(tmp_path: Path) -> None:
    header = SeriesHeader(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(tmp_path / "a", EXACT, replace(GRID, slice_positions_mm=(0.0,)), header)
    coronal = replace(GRID, column_direction=(0.0, 0.0, -1.0), slice_positions_mm=(0.0,))
    write_series(tmp_path / "b", EXACT, coronal, header)

    error = load_error(tmp_path)

    assert error.reason == Reason.LOCALIZER and "LOCALIZER" in error.message


@pytest.mark.parametrize("positions", [(0.0,), (0.0, 5.0), (0.0, 0.0, 5.0)], ids=["one", "two", "two_positions"])
def test_fewer_than_three_slice_positions_are_too_few(tmp_path: Path, positions: tuple[float, ...]) -> None:
    header = SeriesHeader()
    for n, position in enumerate(positions):
        write_series(tmp_path / str(n), EXACT, replace(GRID, slice_positions_mm=(position,)), header)

    assert load_error(tmp_path).reason == Reason.TOO_FEW_SLICES


@pytest.mark.parametrize(
    ("keyword", "tag"),
    [("ImagePositionPatient", "(0020,0032)"), ("PixelSpacing", "(0028,0030)"), ("RescaleSlope", "(0028,1053)")],
)
def test_a_missing_geometry_or_rescale_attribute_is_named(tmp_path: Path, keyword: str, tag: str) -> None:
    paths = write_series(tmp_path, EXACT, GRID)
    rewrite(paths[2:3], lambda ds: delattr(ds, keyword))

    error = load_error(tmp_path)

    assert error.reason == Reason.MISSING_ATTRIBUTE and tag in error.message


def test_enhanced_multiframe_ct_is_reported_as_unsupported(tmp_path: Path) -> None:
    paths = write_series(tmp_path, EXACT, GRID)

    def make_enhanced(ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage

    rewrite(paths, make_enhanced)

    assert load_error(tmp_path).reason == Reason.UNSUPPORTED_MULTIFRAME


# ---------------------------------------------------------------------------------------
# empty UIDs


def test_files_with_empty_uids_use_the_file_meta_and_are_grouped_by_folder(tmp_path: Path) -> None:
    for folder in ("one", "two"):
        paths = write_series(tmp_path / folder, EXACT, GRID)

        def empty_uids(ds: Dataset) -> None:
            ds.SOPInstanceUID = ds.SeriesInstanceUID = ""

        rewrite(paths, empty_uids)

    found = discover([tmp_path])
    assert len(found.series) == 2
    assert {f.parent.name for f in found.series[0].files} != {f.parent.name for f in found.series[1].files}
    assert [s.series_uid for s in discover([tmp_path]).series] == [s.series_uid for s in found.series]

    ct = load_series(found.series[0])

    assert [w.code for w in ct.warnings] == [Reason.MISSING_ATTRIBUTE, Reason.MISSING_ATTRIBUTE]
    assert "grouped the files of" in ct.warnings[1].message and ct.series_uid in ct.warnings[1].message
    assert all(ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID for ds in ct.datasets)
    assert ct.study_uid == ct.datasets[0].StudyInstanceUID != ""


# ---------------------------------------------------------------------------------------
# real data


def test_real_ircadb_series_loads_with_its_shape_and_spacing(shared_data: Path) -> None:
    ct = load_one(shared_data / "3dircadb-1.1" / "PATIENT_DICOM")

    assert ct.volume.array.shape == (129, 512, 512)
    assert ct.volume.spacing == pytest.approx((0.57, 0.57, 1.6), abs=1e-4)
    assert np.allclose(ct.volume.direction, np.eye(3))


@pytest.mark.parametrize(
    ("folder", "slices", "step"),
    [
        ("LIDC-IDRI-0001_ctIV_16sl", 16, 2.5),
        ("LIDC-IDRI-0002_noCBA_12sl", 12, 1.25),
        ("LIDC-IDRI-0003_oralIV_11sl", 11, 2.5),
    ],
)
def test_real_feet_first_lidc_series_load_in_increasing_z(
    shared_data: Path, folder: str, slices: int, step: float
) -> None:
    ct = load_one(shared_data / "lidc-idri-partial" / folder)

    assert ct.volume.array.shape == (slices, 512, 512) and ct.volume.spacing[2] == pytest.approx(step)
    z = [float(ds.ImagePositionPatient[2]) for ds in ct.datasets]
    assert z == sorted(z) and ct.volume.origin[2] == pytest.approx(z[0])
    assert str(ct.datasets[0].PatientPosition) == "FFS" and ct.warnings == ()
    inside_field_of_view = ct.volume.array[ct.volume.array > -1500]  # GE pads outside the circle with -2048 HU
    assert -1100 < float(np.percentile(inside_field_of_view, 1)) < -900  # air in HU


def test_real_implicit_vr_series_loads(shared_data: Path) -> None:
    ct = load_one(shared_data / "misc-dicom" / "ct-3slice_colonography")

    assert ct.datasets[0].file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    assert ct.volume.array.shape == (3, 512, 512) and ct.volume.spacing[2] == pytest.approx(1.0)


def test_real_jpeg2000_series_with_uids_only_in_the_file_meta_loads_with_warnings(
    shared_data: Path, tmp_path: Path
) -> None:
    source = shared_data / "totalsegmentator-example" / "example_ct_dicom"
    error = load_error(source)  # its Study Instance UID is empty too: no study for the outputs to join
    assert error.reason == Reason.MISSING_ATTRIBUTE and "(0020,000D) 'Study Instance UID' is empty" in error.message
    copies = [Path(shutil.copy(path, tmp_path)) for path in sorted(source.iterdir())]
    rewrite(copies, lambda ds: setattr(ds, "StudyInstanceUID", "1.2.826.0.1.3680043.8.498.1"))

    ct = load_one(tmp_path)

    assert ct.datasets[0].file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert ct.volume.array.shape == (20, 512, 512)
    assert [w.code for w in ct.warnings] == [Reason.MISSING_ATTRIBUTE, Reason.MISSING_ATTRIBUTE]
    assert all(ds.SOPInstanceUID and ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID for ds in ct.datasets)
    assert -1100 < float(ct.volume.array.min()) < -900


def test_real_lossy_jpeg2000_slices_decode_but_two_slices_are_too_few(shared_data: Path) -> None:
    folder = shared_data / "misc-dicom" / "Comunix_CT_headneck"
    ds = pydicom.dcmread(sorted(folder.iterdir())[0])

    hu = decode_hu(ds)

    assert ds.file_meta.TransferSyntaxUID == JPEG2000 and hu.shape == (512, 512)
    assert -1100 < float(hu.min()) < -900 and float(hu.max()) > 500  # air and bone
    assert load_error(folder).reason == Reason.TOO_FEW_SLICES


def test_real_localizer_and_seg_are_not_loaded_as_ct(shared_data: Path) -> None:
    assert load_error(shared_data / "misc-dicom" / "Phenix_CT_head").reason == Reason.LOCALIZER
    (skipped,) = discover([shared_data / "misc-dicom" / "liver.dcm"]).skipped
    assert skipped.finding.code == Reason.NOT_CT and "Segmentation Storage" in skipped.finding.message
