"""A user's liver mask from NIfTI, DICOM SEG or a DICOM image series, placed on the CT's grid."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from liverfat.dicom_io.read import discover, load_series, read_mask
from liverfat.dicom_io.series import CTSeries
from liverfat.errors import LiverfatError, Reason
from liverfat.volume import Volume
from tests.phantom import Ellipsoid, Grid, Phantom, SeriesHeader, render_volume, write_series

# Slices from -80 to 80 mm: the liver (z within +-60 mm) is absent from the outer slices,
# so highdicom omits those frames from the SEG and the reader must place frames by position.
GRID = Grid(rows=48, columns=48, pixel_spacing_mm=7.0, slice_positions_mm=tuple(np.arange(-80.0, 80.1, 5.0)))
EXACT = Phantom(noise_sd_hu=0.0)


def load_ct(folder: Path, grid: Grid = GRID) -> CTSeries:
    write_series(folder, EXACT, grid)
    return load_series(discover([folder]).series[0])


def organ_truth(volume: Volume, organ: Ellipsoid) -> np.ndarray:
    """Which voxels of ``volume`` lie inside the analytic organ."""
    k, j, i = np.indices(volume.array.shape)
    return organ.contains(volume.to_lps(np.stack([i, j, k], axis=-1).astype(np.float64)))


def liver_truth(volume: Volume) -> np.ndarray:
    return organ_truth(volume, EXACT.liver)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def write_nifti(path: Path, volume: Volume) -> Path:
    sitk.WriteImage(volume.with_array(volume.array.astype(np.uint8)).to_sitk(), str(path))
    return path


def write_seg(path: Path, ct: CTSeries, segments: list[tuple[str, Code, np.ndarray]]) -> Path:
    """A BINARY SEG on the CT's own slices, one segment per (label, property type, mask)."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, (label, property_type, _) in enumerate(segments, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(ct.datasets),
        pixel_array=np.stack([mask for _, _, mask in segments], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=300,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="liverfat tests",
        manufacturer_model_name="phantom",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(path)
    return path


# ---------------------------------------------------------------------------------------
# NIfTI


def test_nifti_mask_on_another_grid_is_resampled_onto_the_ct_grid(tmp_path: Path) -> None:
    ct = load_ct(tmp_path / "ct")
    finer_feet_first = replace(
        GRID,
        rows=96,
        columns=96,
        pixel_spacing_mm=3.5,
        row_direction=(-1.0, 0.0, 0.0),
        slice_positions_mm=tuple(np.arange(70.0, -70.1, -2.5)),
    )
    _, liver = render_volume(EXACT, finer_feet_first)

    mask = read_mask(write_nifti(tmp_path / "liver.nii.gz", liver), ct.volume)

    assert mask.same_grid(ct.volume) and mask.array.dtype == bool
    assert dice(mask.array, liver_truth(ct.volume)) > 0.95  # nearest-neighbour from a 2x finer grid


def test_multi_label_nifti_needs_the_liver_label(tmp_path: Path) -> None:
    ct = load_ct(tmp_path / "ct")
    liver, spleen = liver_truth(ct.volume), organ_truth(ct.volume, EXACT.spleen)
    labels = np.where(liver, 5, np.where(spleen, 3, 0))
    path = write_nifti(tmp_path / "labels.nii.gz", ct.volume.with_array(labels))

    with pytest.raises(LiverfatError, match=r"observed 2 labels \[3, 5\]") as caught:
        read_mask(path, ct.volume)
    assert caught.value.reason == Reason.MASK_MISMATCH
    assert np.array_equal(read_mask(path, ct.volume, label=5).array, liver_truth(ct.volume))


def test_mask_outside_the_ct_is_a_mismatch(tmp_path: Path) -> None:
    ct = load_ct(tmp_path / "ct")
    elsewhere = Volume(liver_truth(ct.volume), ct.volume.spacing, (1000.0, 0.0, 0.0), ct.volume.direction)

    with pytest.raises(LiverfatError, match="does not overlap the CT") as caught:
        read_mask(write_nifti(tmp_path / "far.nii.gz", elsewhere), ct.volume)
    assert caught.value.reason == Reason.MASK_MISMATCH


def test_empty_mask_is_a_mismatch(tmp_path: Path) -> None:
    ct = load_ct(tmp_path / "ct")
    empty = ct.volume.with_array(np.zeros(ct.volume.array.shape, dtype=bool))

    with pytest.raises(LiverfatError, match="empty") as caught:
        read_mask(write_nifti(tmp_path / "empty.nii.gz", empty), ct.volume)
    assert caught.value.reason == Reason.MASK_MISMATCH


def test_a_file_that_is_no_mask_is_not_readable(tmp_path: Path) -> None:
    ct = load_ct(tmp_path / "ct")
    (tmp_path / "notes.txt").write_text("liver\n")

    with pytest.raises(LiverfatError) as caught:
        read_mask(tmp_path / "notes.txt", ct.volume)
    assert caught.value.reason == Reason.NOT_READABLE


# ---------------------------------------------------------------------------------------
# DICOM SEG


def test_seg_liver_segment_is_placed_by_frame_position_onto_a_differently_stored_ct(tmp_path: Path) -> None:
    flipped = replace(GRID, row_direction=(-1.0, 0.0, 0.0), slice_positions_mm=GRID.slice_positions_mm[::-1])
    feet_first = load_ct(tmp_path / "source", flipped)
    seg = write_seg(
        tmp_path / "seg.dcm",
        feet_first,
        [
            ("spleen", codes.SCT.Spleen, organ_truth(feet_first.volume, EXACT.spleen)),
            ("liver", codes.SCT.Liver, liver_truth(feet_first.volume)),
        ],
    )
    assert pydicom.dcmread(seg).NumberOfFrames < 2 * feet_first.volume.array.shape[0]  # empty frames left out
    head_first = load_ct(tmp_path / "reference")

    mask = read_mask(seg, head_first.volume)

    assert mask.same_grid(head_first.volume)
    assert np.array_equal(mask.array, liver_truth(head_first.volume))


def test_seg_with_one_segment_is_used_whatever_its_label(tmp_path: Path) -> None:
    ct = load_ct(tmp_path / "ct")
    seg = write_seg(tmp_path / "seg.dcm", ct, [("organ of interest", codes.SCT.Organ, liver_truth(ct.volume))])

    assert np.array_equal(read_mask(seg, ct.volume).array, liver_truth(ct.volume))


def test_seg_without_a_liver_segment_needs_a_segment_number(tmp_path: Path) -> None:
    ct = load_ct(tmp_path / "ct")
    truth = liver_truth(ct.volume)
    seg = write_seg(
        tmp_path / "seg.dcm", ct, [("first", codes.SCT.Organ, truth), ("second", codes.SCT.Organ, truth[::-1])]
    )

    with pytest.raises(LiverfatError, match="1 'first', 2 'second'") as caught:
        read_mask(seg, ct.volume)
    assert caught.value.reason == Reason.MASK_MISMATCH
    assert np.array_equal(read_mask(seg, ct.volume, label=1).array, truth)


# ---------------------------------------------------------------------------------------
# DICOM image series holding a mask


def test_mask_stored_as_an_image_series_folder_is_thresholded_above_zero(tmp_path: Path) -> None:
    ct = load_ct(tmp_path / "ct")
    zero = Ellipsoid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.0)
    as_image = replace(EXACT, body=replace(EXACT.body, hu=0.0), spleen=zero, liver=replace(EXACT.liver, hu=1.0))
    write_series(tmp_path / "mask", as_image, replace(GRID, pixel_spacing_mm=3.5, rows=96, columns=96), SeriesHeader())

    mask = read_mask(tmp_path / "mask", ct.volume)

    assert dice(mask.array, liver_truth(ct.volume)) > 0.95


# ---------------------------------------------------------------------------------------
# real data


def test_real_seg_frames_land_on_their_source_slices(shared_data: Path) -> None:
    folder = shared_data / "misc-dicom" / "ct-3slice_colonography"
    ct = load_series(discover([folder]).series[0])
    seg = pydicom.dcmread(shared_data / "misc-dicom" / "liver.dcm")

    mask = read_mask(shared_data / "misc-dicom" / "liver.dcm", ct.volume)

    frames = seg.pixel_array.astype(bool)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        i, j, k = np.round(ct.volume.to_index(position)).astype(int)
        assert (i, j) == (0, 0)
        assert np.array_equal(mask.array[k], frame)


def test_real_ircadb_mask_series_marks_the_enhanced_liver(shared_data: Path) -> None:
    root = shared_data / "3dircadb-1.1"
    ct = load_series(discover([root / "PATIENT_DICOM"]).series[0])

    mask = read_mask(root / "MASKS_DICOM" / "liver", ct.volume)

    liver_ml = mask.array.sum() * np.prod(ct.volume.spacing) / 1000
    assert 1000 < liver_ml < 2500
    assert 90 < float(ct.volume.array[mask.array].mean()) < 130  # portal venous phase, about 110 HU
