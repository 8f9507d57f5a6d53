"""DICOM SEG of the liver and ROIs: exact round trip on the source grid, segments, identity."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from liverfat.dicom_io import codes
from liverfat.dicom_io.seg import (
    LIVER_RGB,
    _Segmentation,
    build_seg,
    content_description,
    roi_rgb,
    roi_tracking_id,
    source_headers,
)
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.site import DEFAULT_DISCLAIMER, OutputSettings
from liverfat.dicom_io.uids import frame_of_reference_fallback, output_uids
from liverfat.errors import LiverfatError, Reason
from liverfat.result import USER_MASK, AnalysisResult, Masks, RoiRule
from tests.dicom_io.output_cases import (
    SMALL_GRID,
    dciodvfy_available,
    dciodvfy_errors,
    make_result,
    phantom_series,
    reversed_series,
    with_replaced_roi,
)

SITE = OutputSettings()
CREATED = datetime(2024, 5, 6, 7, 8, 9)
N_SEGMENTS = 4  # liver + three ROIs


def write_and_read(seg: hd.seg.Segmentation, path: Path) -> hd.seg.Segmentation:
    seg.save_as(path, enforce_file_format=True)
    return hd.seg.segread(path)


def segment_masks(seg: hd.seg.Segmentation, series: CTSeries) -> np.ndarray:
    """``(slices, rows, columns, segments)`` in the series' slice order, from the SEG alone."""
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in series.datasets],
        segment_numbers=list(range(1, N_SEGMENTS + 1)),
        assert_missing_frames_are_empty=True,
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTSeries, AnalysisResult]:
    series, liver = phantom_series(tmp_path_factory.mktemp("ct"))
    return series, make_result(series, liver)


def _built(series: CTSeries, result: AnalysisResult, path: Path) -> hd.seg.Segmentation:
    return write_and_read(build_seg(series, result, output_uids(result), SITE, CREATED), path)


def _assert_masks_equal(read: np.ndarray, result: AnalysisResult) -> None:
    assert result.source_masks is not None
    np.testing.assert_array_equal(read[..., 0].astype(bool), result.source_masks.liver.array)
    for label in (1, 2, 3):
        np.testing.assert_array_equal(read[..., label].astype(bool), result.source_masks.rois.array == label)


def test_seg_masks_read_back_equal_the_source_grid_masks(case: tuple[CTSeries, AnalysisResult], tmp_path: Path) -> None:
    series, result = case
    seg = _built(series, result, tmp_path / "seg.dcm")
    _assert_masks_equal(segment_masks(seg, series), result)


def test_seg_round_trips_when_slices_run_against_the_normal(
    case: tuple[CTSeries, AnalysisResult], tmp_path: Path
) -> None:
    series, liver_result = case
    backwards = reversed_series(series)
    assert liver_result.source_masks is not None
    flipped = Masks(
        liver=backwards.volume.with_array(liver_result.source_masks.liver.array[::-1].copy()),
        rois=backwards.volume.with_array(liver_result.source_masks.rois.array[::-1].copy()),
    )
    result = replace(liver_result, source_masks=flipped)
    seg = _built(backwards, result, tmp_path / "seg.dcm")
    _assert_masks_equal(segment_masks(seg, backwards), result)
    positions = {ds.SOPInstanceUID: [float(v) for v in ds.ImagePositionPatient] for ds in series.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], positions[source_uid], atol=1e-3)


def test_seg_leaves_out_empty_frames(case: tuple[CTSeries, AnalysisResult], tmp_path: Path) -> None:
    series, result = case
    assert result.source_masks is not None
    liver = result.source_masks.liver.array
    rois = result.source_masks.rois.array
    occupied = int(liver.reshape(len(liver), -1).any(axis=1).sum())
    occupied += sum(int((rois == label).reshape(len(rois), -1).any(axis=1).sum()) for label in (1, 2, 3))
    seg = _built(series, result, tmp_path / "seg.dcm")
    assert seg.NumberOfFrames == occupied < len(liver) * N_SEGMENTS


@pytest.fixture(scope="module")
def taller_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTSeries, AnalysisResult]:
    """Slices 5 mm apart reaching 15 mm beyond the liver at both ends: some hold no segment."""
    grid = replace(SMALL_GRID, slice_positions_mm=tuple(np.arange(-75.0, 75.1, 5.0)))
    series, liver = phantom_series(tmp_path_factory.mktemp("ct"), grid=grid)
    return series, make_result(series, liver)


def test_slices_without_a_segment_are_referenced_after_those_with_frames(
    taller_case: tuple[CTSeries, AnalysisResult], tmp_path: Path
) -> None:
    """The whole series is referenced in the order highdicom gives source, then further source images."""
    series, result = taller_case
    assert result.source_masks is not None
    slices = len(series.datasets)
    occupied = result.source_masks.liver.array.reshape(slices, -1).any(axis=1)
    occupied |= result.source_masks.rois.array.reshape(slices, -1).any(axis=1)
    assert 0 < occupied.sum() < slices
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    expected = [uids[k] for k in np.flatnonzero(occupied)] + [uids[k] for k in np.flatnonzero(~occupied)]
    seg = _built(series, result, tmp_path / "seg.dcm")
    assert [item.ReferencedSOPInstanceUID for item in seg.SourceImageSequence] == expected
    (referenced,) = seg.ReferencedSeriesSequence
    assert [item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence] == expected
    assert {item.ReferencedSOPClassUID for item in seg.SourceImageSequence} == {series.datasets[0].SOPClassUID}
    framed = {
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert framed == set(expected[: int(occupied.sum())])


def test_seg_says_its_segments_overlap_as_the_rois_lie_in_the_liver(
    case: tuple[CTSeries, AnalysisResult], tmp_path: Path
) -> None:
    """The overlap check runs on the stacked masks and finds the ROIs inside the liver."""
    series, result = case
    assert result.source_masks is not None
    assert (result.source_masks.liver.array & (result.source_masks.rois.array > 0)).any()
    assert _built(series, result, tmp_path / "seg.dcm").SegmentsOverlap == "YES"


def _stacked(frames: int, overlap_at: int | None) -> np.ndarray:
    """Three 0/1 segments on ``frames`` 8 x 8 frames, overlapping at one pixel of frame ``overlap_at`` only."""
    stacked = np.zeros((frames, 8, 8, 3), dtype=np.uint8)
    stacked[:, 0, 0, 0] = 1
    stacked[:, 1, 1, 1] = 1
    stacked[:, 2, 2, 2] = 1
    if overlap_at is not None:
        stacked[overlap_at, 0, 0, 2] = 1
    return stacked


@pytest.mark.parametrize("overlap_at", [None, 0, 15, 16, 32])
def test_blockwise_overlap_check_answers_as_highdicoms_own(overlap_at: int | None) -> None:
    """The block-by-block check (blocks of 16 frames) finds an overlap in any block, and none where there is none."""
    numbers = np.array([1, 2, 3])
    binary = hd.seg.SegmentationTypeValues.BINARY
    stacked = _stacked(33, overlap_at)
    ours = _Segmentation._check_and_cast_pixel_array(stacked, numbers, binary, np.uint8)
    theirs = hd.seg.Segmentation._check_and_cast_pixel_array(stacked, numbers, binary, np.uint8)
    expected = hd.seg.SegmentsOverlapValues.NO if overlap_at is None else hd.seg.SegmentsOverlapValues.YES
    assert ours[1] == theirs[1] == expected
    assert ours[0] is stacked and theirs[0] is stacked


def test_blockwise_overlap_check_leaves_a_non_binary_array_to_highdicom() -> None:
    stacked = _stacked(4, None)
    stacked[2, 3, 3, 1] = 2
    with pytest.raises(ValueError, match="must be binary"):
        _Segmentation._check_and_cast_pixel_array(
            stacked, np.array([1, 2, 3]), hd.seg.SegmentationTypeValues.BINARY, np.uint8
        )


def test_seg_describes_liver_and_one_segment_per_roi(case: tuple[CTSeries, AnalysisResult], tmp_path: Path) -> None:
    series, result = case
    uids = output_uids(result)
    seg = _built(series, result, tmp_path / "seg.dcm")
    liver, *rois = seg.SegmentSequence
    assert (liver.SegmentLabel, liver.SegmentAlgorithmType) == ("Liver", "AUTOMATIC")
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.ANATOMICAL_STRUCTURE.value
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.LIVER.value == "10200004"
    algorithm = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (result.model.name, result.model.version)
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.ARTIFICIAL_INTELLIGENCE.value
    assert list(liver.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*LIVER_RGB).value)
    assert [segment.SegmentLabel for segment in rois] == ["Liver ROI 1", "Liver ROI 2", "Liver ROI 3"]
    for label, segment in enumerate(rois, start=1):
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.REFERENCE_REGION.value
        assert segment.AnatomicRegionSequence[0].CodeValue == codes.LIVER.value
        assert segment.TrackingUID == uids.tracking(roi_tracking_id(label))
        assert list(segment.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*roi_rgb(label)).value)


def test_user_mask_liver_segment_is_manual(case: tuple[CTSeries, AnalysisResult], tmp_path: Path) -> None:
    series, result = case
    seg = _built(series, replace(result, model=USER_MASK), tmp_path / "seg.dcm")
    liver = seg.SegmentSequence[0]
    assert liver.SegmentAlgorithmType == "MANUAL"
    assert "SegmentationAlgorithmIdentificationSequence" not in liver
    assert seg.SegmentSequence[1].SegmentAlgorithmType == "AUTOMATIC"


def test_seg_is_a_new_series_in_the_source_study(case: tuple[CTSeries, AnalysisResult], tmp_path: Path) -> None:
    series, result = case
    seg = _built(series, result, tmp_path / "seg.dcm")
    source = series.datasets[0]
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                    "SpecificCharacterSet", "FrameOfReferenceUID", "StudyDate", "StudyTime", "StudyID"):
        assert seg[keyword].value == source[keyword].value, keyword
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.SeriesDescription == "liverfat liver SEG"
    assert (seg.SegmentationType, seg.file_meta.TransferSyntaxUID) == ("BINARY", "1.2.840.10008.1.2.1")
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in series.datasets
    }


def test_source_without_frame_of_reference_gets_a_derived_one(
    case: tuple[CTSeries, AnalysisResult], tmp_path: Path
) -> None:
    series, result = case
    headers = source_headers(series)
    for header in headers:
        del header.FrameOfReferenceUID
    stripped = replace(series, datasets=tuple(headers))
    seg = _built(stripped, result, tmp_path / "seg.dcm")
    assert seg.FrameOfReferenceUID == frame_of_reference_fallback(series.series_uid)
    _assert_masks_equal(segment_masks(seg, series), result)


def test_masks_of_another_grid_are_refused(case: tuple[CTSeries, AnalysisResult]) -> None:
    series, result = case
    assert result.source_masks is not None
    liver = result.source_masks.liver
    cropped = type(liver)(liver.array[1:], liver.spacing, liver.origin, liver.direction)
    no_rois = cropped.with_array(np.zeros(cropped.array.shape, np.uint8))
    wrong = replace(result, source_masks=Masks(liver=cropped, rois=no_rois))
    with pytest.raises(LiverfatError, match="expected") as caught:
        build_seg(series, wrong, output_uids(wrong), SITE, CREATED)
    assert caught.value.reason is Reason.MASK_MISMATCH


def test_empty_liver_mask_is_refused(case: tuple[CTSeries, AnalysisResult]) -> None:
    series, result = case
    assert result.source_masks is not None
    empty = result.source_masks.liver.with_array(np.zeros(result.source_masks.liver.array.shape, dtype=bool))
    no_liver = replace(result, rois=(), source_masks=Masks(liver=empty, rois=result.source_masks.rois))
    with pytest.raises(LiverfatError) as caught:
        build_seg(series, no_liver, output_uids(no_liver), SITE, CREATED)
    assert caught.value.reason is Reason.NO_LIVER


def test_replaced_roi_segment_says_so_and_keeps_its_tracking_uid(
    case: tuple[CTSeries, AnalysisResult], tmp_path: Path
) -> None:
    series, result = case
    replaced = with_replaced_roi(result, label=2, rule=RoiRule.NEXT_SLICE)
    seg = _built(series, replaced, tmp_path / "seg.dcm")
    _, *rois = seg.SegmentSequence
    assert [segment.SegmentLabel for segment in rois] == ["Liver ROI 1", "Liver ROI 2 (next slice)", "Liver ROI 3"]
    assert [segment.TrackingID for segment in rois] == [
        "liverfat liver ROI 1", "liverfat liver ROI 2 (next slice)", "liverfat liver ROI 3"]
    uids = output_uids(replaced)
    assert [segment.TrackingUID for segment in rois] == [uids.tracking(roi_tracking_id(n)) for n in (1, 2, 3)]


def test_seg_carries_the_disclaimer_in_its_content_description(
    case: tuple[CTSeries, AnalysisResult], tmp_path: Path
) -> None:
    series, result = case
    short = OutputSettings(disclaimer="Research use only; not a diagnosis.")
    seg = write_and_read(build_seg(series, result, output_uids(result), short, CREATED), tmp_path / "short.dcm")
    assert seg.ContentDescription == "Research use only; not a diagnosis."
    seg = write_and_read(build_seg(series, result, output_uids(result), SITE, CREATED), tmp_path / "default.dcm")
    assert len(DEFAULT_DISCLAIMER) > 64
    assert seg.ContentDescription == "For research / decision support only."
    if dciodvfy_available():
        assert dciodvfy_errors(tmp_path / "default.dcm") == []


@pytest.mark.parametrize(
    ("disclaimer", "expected"),
    [
        ("Research only.", "Research only."),
        (DEFAULT_DISCLAIMER, "For research / decision support only."),
        ("Investigational device, limited by law to investigational use; every result must be reviewed",
         "Investigational device, limited by law to investigational..."),
        ("x" * 80, "x" * 61 + "..."),
        ("  Spaces\n and   newlines  ", "Spaces and newlines"),
    ],
)  # fmt: skip
def test_content_description_fits_the_disclaimer_into_64_characters(disclaimer: str, expected: str) -> None:
    fitted = content_description(disclaimer)
    assert fitted == expected
    assert len(fitted) <= 64
