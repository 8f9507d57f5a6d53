"""Key image: largest liver slice, soft-tissue window, outline and circles, text, SC identity."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from liverfat.dicom_io.keyimage import (
    WINDOW_CENTRE_HU,
    WINDOW_WIDTH_HU,
    build_key_image,
    key_slice_index,
    patient_orientation,
    render_key_image,
    text_block,
)
from liverfat.dicom_io.site import OutputSettings
from liverfat.dicom_io.seg import LIVER_RGB, roi_rgb
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.sr import grade_sentence
from liverfat.dicom_io.uids import output_uids
from liverfat.result import AnalysisResult
from tests.dicom_io.output_cases import make_result, not_graded, phantom_series

SITE = OutputSettings(disclaimer="Research use at Example Hospital only.")
CREATED = datetime(2024, 5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTSeries, np.ndarray, AnalysisResult]:
    series, liver = phantom_series(tmp_path_factory.mktemp("ct"))
    return series, liver, make_result(series, liver)


def test_key_slice_is_the_source_slice_with_most_liver(case: tuple[CTSeries, np.ndarray, AnalysisResult]) -> None:
    series, liver, result = case
    assert key_slice_index(series, result) == int(np.argmax(liver.reshape(len(liver), -1).sum(axis=1)))


def test_slice_is_shown_in_a_soft_tissue_window(case: tuple[CTSeries, np.ndarray, AnalysisResult]) -> None:
    series, liver, result = case
    rgb, k, scale = render_key_image(series, result, SITE)
    # a pixel deep inside the liver, away from outline and circles: grey = windowed HU
    inner = ndimage.binary_erosion(liver[k], iterations=6) & ~ndimage.binary_dilation(
        result.source_masks.rois.array[k] > 0, iterations=6  # type: ignore[union-attr]
    )
    row, column = np.argwhere(inner)[0]
    hu = series.volume.array[k][row, column]
    expected = np.clip((hu - (WINDOW_CENTRE_HU - WINDOW_WIDTH_HU / 2)) / WINDOW_WIDTH_HU * 255, 0, 255)
    pixel = rgb[row * scale + scale // 2, column * scale + scale // 2]
    assert pixel[0] == pixel[1] == pixel[2]
    assert abs(int(pixel[0]) - expected) <= 20  # bilinear enlargement mixes neighbours


def test_liver_outline_and_each_roi_are_drawn_in_their_segment_colours(
    case: tuple[CTSeries, np.ndarray, AnalysisResult],
) -> None:
    series, liver, _ = case
    apart = make_result(series, liver, spread_mm=25.0)
    rgb, _, _ = render_key_image(series, apart, SITE)
    for colour in (LIVER_RGB, roi_rgb(1), roi_rgb(2), roi_rgb(3)):
        assert np.all(rgb == colour, axis=-1).sum() > 20, colour


def test_text_block_states_grade_figures_and_the_sites_disclaimer(
    case: tuple[CTSeries, np.ndarray, AnalysisResult],
) -> None:
    series, liver, result = case
    texts = [text for text, _ in text_block(result, SITE)]
    assert texts[0] == grade_sentence(result)
    assert f"{result.parenchymal_hu:.1f} HU" in texts[0]
    assert SITE.disclaimer in texts
    withheld = [text for text, _ in text_block(not_graded(series, liver), SITE)]
    assert withheld[0].startswith("Not graded: aorta 180 HU")


def test_text_panel_is_rendered_below_the_image(case: tuple[CTSeries, np.ndarray, AnalysisResult]) -> None:
    series, _, result = case
    rgb, _, scale = render_key_image(series, result, SITE)
    height = series.volume.array.shape[1] * scale
    assert rgb.shape[0] > height
    panel = rgb[height:]
    assert (panel > 128).any()
    other, _, _ = render_key_image(series, result, replace(SITE, disclaimer="Another disclaimer text."))
    assert not np.array_equal(other[height:], panel)


def test_key_image_is_a_secondary_capture_in_the_source_study(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path: Path
) -> None:
    series, _, result = case
    image = build_key_image(series, result, output_uids(result), SITE, CREATED)
    image.save_as(tmp_path / "key.dcm", enforce_file_format=True)
    read = pydicom.dcmread(tmp_path / "key.dcm")
    k = key_slice_index(series, result)
    source = series.datasets[k]
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "SpecificCharacterSet", "AccessionNumber"):
        assert read[keyword].value == source[keyword].value, keyword
    assert (read.SeriesDescription, read.BurnedInAnnotation, read.PhotometricInterpretation) == (
        "liverfat key image", "NO", "RGB")
    assert read.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    scale = read.Columns // source.Columns
    assert [float(v) for v in read.PixelSpacing] == pytest.approx([float(v) / scale for v in source.PixelSpacing])
    assert list(read.PatientOrientation) == ["L", "P"]
    assert (read.ContentDate, read.InstanceCreationDate) == ("20240506", "20240506")


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], ("L", "P")),
        ([-1, 0, 0, 0, -1, 0], ("R", "A")),
        ([0, 1, 0, 0, 0, -1], ("P", "F")),
        ([0.98, 0.2, 0, -0.2, 0.98, 0], ("L", "P")),
    ],
)
def test_patient_orientation_names_the_dominant_axes(orientation: list[float], expected: tuple[str, str]) -> None:
    dataset = pydicom.Dataset()
    dataset.ImageOrientationPatient = orientation
    assert patient_orientation(dataset) == expected
