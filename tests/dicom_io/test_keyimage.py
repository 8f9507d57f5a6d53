"""Key image: the middle ROI's slice, soft-tissue window, outline and circles, labels that never
overlap, the borderline badge, text in words without DICOM tags, SC identity."""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from liverfat.dicom_io.keyimage import (
    ALERT_RGB,
    WINDOW_CENTRE_HU,
    WINDOW_WIDTH_HU,
    Box,
    build_key_image,
    key_slice_index,
    patient_orientation,
    place_labels,
    render_key_image,
    text_block,
)
from liverfat.dicom_io.seg import LIVER_RGB, roi_rgb
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.site import OutputSettings
from liverfat.dicom_io.sr import grade_sentence
from liverfat.dicom_io.uids import output_uids
from liverfat.errors import Finding, Reason
from liverfat.result import AnalysisResult, RoiRule
from tests.dicom_io.output_cases import borderline, make_result, not_graded, phantom_series, with_replaced_roi

SITE = OutputSettings(disclaimer="Research use at Example Hospital only.")
CREATED = datetime(2024, 5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTSeries, np.ndarray, AnalysisResult]:
    series, liver = phantom_series(tmp_path_factory.mktemp("ct"))
    return series, liver, make_result(series, liver)


def test_key_slice_is_the_middle_rois_slice_else_the_one_with_most_liver(
    case: tuple[CTSeries, np.ndarray, AnalysisResult],
) -> None:
    series, liver, result = case
    most_liver = int(np.argmax(liver.reshape(len(liver), -1).sum(axis=1)))
    (middle,) = [roi for roi in result.rois if roi.label == 2]
    assert key_slice_index(series, result) == middle.slice_index == most_liver
    shifted = make_result(series, liver, roi_offsets=(-3, -1, 1))  # the middle ROI one slice above the largest
    assert key_slice_index(series, shifted) == most_liver - 1
    assert key_slice_index(series, replace(result, rois=())) == most_liver


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
    assert f"{result.graded_hu:.1f} HU" in texts[0]
    assert SITE.disclaimer in texts
    withheld = [text for text, _ in text_block(not_graded(series, liver), SITE)]
    assert withheld[0].startswith("Not graded: aorta 180 HU")


def test_dl_parenchymal_is_explained_in_words_with_each_rois_mean(
    case: tuple[CTSeries, np.ndarray, AnalysisResult],
) -> None:
    _, _, result = case
    rois = sorted(result.rois, key=lambda r: r.label)
    figures = text_block(result, SITE)[1][0]
    assert figures.startswith("DL-parenchymal = mean attenuation of three round liver ROIs, 16 mm across (")
    assert f"{np.mean([roi.area_mm2 for roi in rois]) / 100:.1f} cm2 each)" in figures
    assert figures.endswith(", ".join(f"ROI {roi.label}: {roi.mean_hu:.1f}" for roi in rois) + " HU")


def test_replaced_roi_is_named_as_a_replacement_in_the_figures(
    case: tuple[CTSeries, np.ndarray, AnalysisResult],
) -> None:
    _, _, result = case
    replaced = with_replaced_roi(result, label=3, rule=RoiRule.SHIFTED)
    texts = [text for text, _ in text_block(replaced, SITE)]
    figures = texts[1]
    assert figures.startswith("The graded value = mean attenuation of three")
    assert "ROI 3 (shifted): " in figures and "ROI 2 (" not in figures
    assert f"Grade basis: {replaced.grade_basis}" in texts
    assert not any(text.startswith("Grade basis") for text, _ in text_block(result, SITE))


TAG = re.compile(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)")


def test_no_dicom_tag_numbers_reach_the_radiologist(case: tuple[CTSeries, np.ndarray, AnalysisResult]) -> None:
    series, liver, result = case
    reason = Finding(Reason.SLICE_TOO_THICK, "SliceThickness 7.5 mm exceeds the 5 mm limit, see (0018,0050)")
    warning = Finding(Reason.REGION_FROM_IMAGE, "no header names a region (see (0018,0015), (0008,1030)): image")
    for shown in (replace(not_graded(series, liver), reasons=(reason,)), replace(result, warnings=(warning,))):
        texts = [text for text, _ in text_block(shown, SITE)]
        assert not any(TAG.search(text) for text in texts), texts
    assert "Not graded: SliceThickness 7.5 mm exceeds the 5 mm limit." in [
        text for text, _ in text_block(replace(not_graded(series, liver), reasons=(reason,)), SITE)]
    assert "Note: no header names a region: image" in [
        text for text, _ in text_block(replace(result, warnings=(warning,)), SITE)]


def _badge_pixels(rgb: np.ndarray) -> int:
    corner = rgb[:60, :300]
    return int(np.all(corner == ALERT_RGB, axis=-1).sum())


def test_borderline_result_carries_a_badge_on_the_image_and_an_alert_headline(
    case: tuple[CTSeries, np.ndarray, AnalysisResult],
) -> None:
    series, _, result = case
    near = borderline(result, 41.3)
    plain, _, _ = render_key_image(series, result, SITE)
    flagged, _, _ = render_key_image(series, near, SITE)
    assert _badge_pixels(plain) == 0
    assert _badge_pixels(flagged) > 500
    headline, colour = text_block(near, SITE)[0]
    assert colour == ALERT_RGB and "borderline, review the image" in headline
    assert text_block(result, SITE)[0][1] != ALERT_RGB  # 55 HU, clear of the threshold


def _pairs_overlap(boxes: list[Box]) -> list[tuple[Box, Box]]:
    return [(a, b) for a, b in itertools.combinations(boxes, 2)
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]  # fmt: skip


def _inside(box: Box, bounds: tuple[float, float]) -> bool:
    return box[0] >= 0 and box[1] >= 0 and box[2] <= bounds[0] and box[3] <= bounds[1]


def test_labels_of_coinciding_circles_do_not_overlap() -> None:
    """The three ROIs lie at nearly the same in-plane spot: their labels must still be apart."""
    circles = [(200.0, 200.0, 16.0), (201.0, 202.0, 16.0), (199.0, 201.0, 16.0)]
    sizes = [(50.0, 18.0), (150.0, 18.0), (50.0, 18.0)]  # "ROI 2 (next slice)" is the long one
    spots = place_labels(circles, sizes, (512.0, 512.0))
    boxes = [spot.box for spot in spots]
    assert _pairs_overlap(boxes) == []
    assert all(_inside(box, (512.0, 512.0)) for box in boxes)
    assert [(round(b[2] - b[0]), round(b[3] - b[1])) for b in boxes] == [(50, 18), (150, 18), (50, 18)]
    # the first label sits right of its circle, touching distance, no leader line
    assert boxes[0][0] == pytest.approx(216.0 + 4.0) and not spots[0].leader


def test_labels_never_overlap_for_random_clusters_at_edges_and_in_cramped_images() -> None:
    rng = np.random.default_rng(7)
    for trial in range(300):
        width, height = (512.0, 512.0) if trial % 3 else (120.0, 90.0)
        centre = rng.uniform([0, 0], [width, height])
        circles = [(float(centre[0] + dx), float(centre[1] + dy), float(r)) for dx, dy, r in
                   zip(rng.normal(0, 6, 3), rng.normal(0, 6, 3), rng.uniform(3, 20, 3))]  # fmt: skip
        sizes = [(float(w), 18.0) for w in rng.uniform(30, 110, 3)]
        boxes = [spot.box for spot in place_labels(circles, sizes, (width, height))]
        assert _pairs_overlap(boxes) == [], (trial, circles, boxes)


def test_labels_are_kept_off_the_circles_when_there_is_room() -> None:
    circles = [(100.0, 100.0, 10.0), (104.0, 100.0, 10.0), (102.0, 103.0, 10.0)]
    spots = place_labels(circles, [(40.0, 16.0)] * 3, (400.0, 400.0))
    for spot in spots:
        left, top, right, bottom = spot.box
        for cx, cy, r in circles:
            nearest = (min(max(cx, left), right), min(max(cy, top), bottom))
            assert np.hypot(nearest[0] - cx, nearest[1] - cy) >= r


def test_rendered_labels_do_not_change_the_circles_colours_count(
    case: tuple[CTSeries, np.ndarray, AnalysisResult],
) -> None:
    """A replaced ROI's longer label is drawn too: its colour appears beside its circle."""
    series, liver, result = case
    plain, _, _ = render_key_image(series, result, SITE)
    replaced, _, _ = render_key_image(series, with_replaced_roi(result, label=2), SITE)
    colour = roi_rgb(2)
    height = series.volume.array.shape[1] * (plain.shape[1] // series.volume.array.shape[2])
    more = np.all(replaced[:height] == colour, axis=-1).sum() - np.all(plain[:height] == colour, axis=-1).sum()
    assert more > 20  # " (next slice)" adds text in ROI 2's colour on the image


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
