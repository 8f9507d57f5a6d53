"""The two TID 1500 SRs: measurements, units, codes and references read back; circles match the SEG ROIs.

The circle SR (title Imaging Measurement Report) holds only the ROI circles, which OHIF draws;
the summary SR (another title, which OHIF shows as text) holds the grade first, then the liver.
Both are preliminary and unverified machine results; the summary carries the site's disclaimer,
codes what the method says (moderate-to-severe steatosis present / not detected / undetermined),
flags a borderline value, and shows the graded value beside the seed-exact one when replaced
ROIs made them differ.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import cast

import highdicom as hd
import numpy as np
import pytest
from highdicom.sr.templates import Template
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from liverfat.dicom_io import codes
from liverfat.dicom_io.seg import LIVER_SEGMENT, build_seg, roi_segment_numbers, roi_tracking_id
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.site import OutputSettings
from liverfat.dicom_io.sr import (
    GRADE_TRACKING_ID,
    build_circle_sr,
    build_summary_sr,
    grade_sentence,
    place_circle,
    place_circles,
    summary_title,
    without_tags,
)
from liverfat.dicom_io.uids import output_uids
from liverfat.errors import Finding, Reason
from liverfat.result import USER_MASK, AnalysisResult, Grade, RoiMeasurement, RoiRule
from tests.dicom_io.output_cases import borderline, make_result, not_graded, phantom_series, with_replaced_roi

ALGORITHM_NAME = "111001"
ALGORITHM_VERSION = "111003"
Case = tuple[CTSeries, np.ndarray]
SR = hd.sr.Comprehensive3DSR
Graded = tuple[CTSeries, AnalysisResult, SR, SR, hd.seg.Segmentation]
SITE = OutputSettings(station_name="LIVERFAT-TEST", device_uid="2.25.1234")
CREATED = datetime(2024, 5, 6, 7, 8, 9)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return phantom_series(tmp_path_factory.mktemp("ct"))


def written(series: CTSeries, result: AnalysisResult, folder: Path) -> tuple[SR, SR, hd.seg.Segmentation]:
    """Circle SR, summary SR and SEG written to files and read back by highdicom."""
    uids = output_uids(result)
    seg = build_seg(series, result, uids, SITE, CREATED)
    seg.save_as(folder / "seg.dcm", enforce_file_format=True)
    build_circle_sr(series, result, uids, SITE, CREATED).save_as(folder / "sr.dcm", enforce_file_format=True)
    summary = build_summary_sr(series, result, seg, uids, SITE, CREATED)
    summary.save_as(folder / "sr-summary.dcm", enforce_file_format=True)
    return hd.sr.srread(folder / "sr.dcm"), hd.sr.srread(folder / "sr-summary.dcm"), hd.seg.segread(folder / "seg.dcm")


def summary_of(series: CTSeries, result: AnalysisResult, folder: Path) -> SR:
    """Only the summary SR of ``result`` (written and read back)."""
    return written(series, result, folder)[1]


@pytest.fixture(scope="module")
def graded(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Graded:
    series, liver = case
    result = make_result(series, liver)
    circles, summary, seg = written(series, result, tmp_path_factory.mktemp("out"))
    return series, result, circles, summary, seg


def _report(sr: SR) -> hd.sr.MeasurementReport:
    return cast(hd.sr.MeasurementReport, sr.content)


def _code(concept: object) -> tuple[str, str] | None:
    if concept is None:
        return None
    assert isinstance(concept, hd.sr.CodedConcept)
    return (concept.value, concept.scheme_designator)


def _circle_source_uid(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> str:
    """The SOP Instance UID of the image a group's SCOORD lies on (SELECTED FROM child)."""
    return str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _by_label(result: AnalysisResult) -> list[RoiMeasurement]:
    return sorted(result.rois, key=lambda r: r.label)


def _by_sop_uid(series: CTSeries) -> dict[str, int]:
    return {ds.SOPInstanceUID: k for k, ds in enumerate(series.datasets)}


def _children(item: Dataset, relationship: str, code_value: str) -> list[Dataset]:
    return [child for child in item.get("ContentSequence", []) if child.RelationshipType == relationship
            and child.ConceptNameCodeSequence[0].CodeValue == code_value]  # fmt: skip


def test_each_roi_is_a_circle_group_on_its_source_slice(graded: Graded) -> None:
    series, result, circles, _, _ = graded
    uids = output_uids(result)
    groups = _report(circles).get_planar_roi_measurement_groups()
    assert len(groups) == 3
    for roi, group in zip(_by_label(result), groups):
        assert group.tracking_identifier == roi_tracking_id(roi.label)
        assert group.tracking_uid == uids.tracking(roi_tracking_id(roi.label))
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.CIRCLE
        k = _by_sop_uid(series)[_circle_source_uid(group)]
        assert k == roi.slice_index  # the circles were placed on source slices
        assert group.finding_sites == []  # on the NUMs only
        mean, area = group.get_measurements()
        assert (_code(mean.name), _code(mean.unit), _code(mean.derivation)) == (
            ("112031", "DCM"), ("[hnsf'U]", "UCUM"), ("373098007", "SCT"))
        assert [_code(site.value) for site in mean.finding_sites] == [("10200004", "SCT")]
        assert mean.value == pytest.approx(roi.mean_hu, abs=0.01)
        (area_site,) = area.finding_sites
        assert (_code(area.name), _code(area.unit), _code(area_site.value)) == (
            ("42798000", "SCT"), ("mm2", "UCUM"), ("10200004", "SCT"))
        assert area.value == pytest.approx(roi.area_mm2, abs=0.1)


def test_roi_sd_is_a_statistical_property_of_the_mean_not_a_second_attenuation(graded: Graded) -> None:
    """OHIF labels every group-level NUM; an SD with the mean's concept name read as a second mean."""
    _, result, circles, _, _ = graded
    for roi, group in zip(_by_label(result), _report(circles).get_planar_roi_measurement_groups()):
        numbers = [item for item in group[0].ContentSequence if item.ValueType == "NUM"]
        assert [item.ConceptNameCodeSequence[0].CodeValue for item in numbers] == ["112031", "42798000"]
        (sd,) = _children(numbers[0], "HAS PROPERTIES", codes.STANDARD_DEVIATION.value)
        assert sd.ValueType == "NUM"
        assert sd.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
        assert float(sd.MeasuredValueSequence[0].NumericValue) == pytest.approx(roi.sd_hu, abs=0.01)


def test_sr_circles_coincide_with_the_seg_roi_pixels(graded: Graded) -> None:
    series, result, circles, _, seg = graded
    numbers = roi_segment_numbers(result)
    positions = _by_sop_uid(series)
    for roi, group in zip(_by_label(result), _report(circles).get_planar_roi_measurement_groups()):
        source_uid = _circle_source_uid(group)
        (centre, perimeter) = group.roi.value
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source_uid],
            segment_numbers=[numbers[roi.label]],
            assert_missing_frames_are_empty=True,
        )[0, ..., 0]
        rows, columns = np.nonzero(pixels)
        assert len(rows) > 0, f"SEG ROI {roi.label} is empty on slice {positions[source_uid]}"
        # SCOORD (column, row) with (0.5, 0.5) at the centre of the first pixel
        np.testing.assert_allclose(centre, [columns.mean() + 0.5, rows.mean() + 0.5], atol=1.0)
        radius_px = float(np.linalg.norm(np.asarray(perimeter) - np.asarray(centre)))
        assert radius_px == pytest.approx(np.sqrt(len(rows) / np.pi), abs=0.5)


def test_circle_sr_holds_only_groups_with_an_image_region(graded: Graded) -> None:
    """OHIF 3.13 crashes on a 126000 measurement group without an image region."""
    _, _, circles, _, _ = graded
    report = _report(circles)
    assert report.get_volumetric_roi_measurement_groups() == []
    assert report.get_image_measurement_groups() == []
    assert len(report.get_planar_roi_measurement_groups()) == 3


def test_liver_group_references_the_seg_liver_segment_and_the_source_series(graded: Graded) -> None:
    series, result, _, summary, seg = graded
    (group,) = _report(summary).get_volumetric_roi_measurement_groups()
    images = [item for item in group[0].ContentSequence if item.ValueType == "IMAGE"]
    assert [item.ConceptNameCodeSequence[0].CodeMeaning for item in images] == ["Referenced Segment"]
    reference = images[0].ReferencedSOPSequence[0]
    assert (reference.ReferencedSOPInstanceUID, reference.ReferencedSegmentNumber) == (
        seg.SOPInstanceUID, LIVER_SEGMENT)
    (source,) = [item for item in group[0].ContentSequence if item.ValueType == "UIDREF"
                 and item.ConceptNameCodeSequence[0].CodeMeaning == "Source Series for Segmentation"]
    assert source.UID == series.series_uid
    mean, volume = group.get_measurements()
    assert (_code(mean.name), _code(mean.derivation), _code(mean.method)) == (
        ("112031", "DCM"), ("373098007", "SCT"), _code(codes.DL_VOLUMETRIC))
    assert mean.value == pytest.approx(result.volumetric_hu, abs=0.01)
    assert (_code(volume.name), _code(volume.unit)) == (("118565006", "SCT"), ("ml", "UCUM"))
    assert volume.value == pytest.approx(result.liver_volume_ml, abs=0.1)
    assert _text_values(group, ALGORITHM_NAME) == [result.model.name]
    assert _text_values(group, ALGORITHM_VERSION) == [result.model.version]


def _text_values(group: Template, code_value: str) -> list[str]:
    """TEXT values with concept ``code_value`` anywhere in a group."""
    found = []
    pending = list(group[0].ContentSequence)
    while pending:
        item = pending.pop(0)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == code_value:
            found.append(item.TextValue)
        pending.extend(item.get("ContentSequence", []))
    return found


def _measurement_groups(sr: SR) -> list[Dataset]:
    (measurements,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(measurements.ContentSequence)


def _grade_group(sr: SR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    (group,) = _report(sr).get_image_measurement_groups()
    assert group.tracking_identifier == GRADE_TRACKING_ID
    return group


def _texts(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {}
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT":
            texts.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item.TextValue)
    return texts


def test_summary_sr_puts_the_grade_group_first_and_the_liver_second(graded: Graded) -> None:
    """OHIF shows the summary as a text page in content order: the grade must be on top."""
    _, _, _, summary, _ = graded
    tracking_identifier = "112039"
    identifiers = [
        next(item.TextValue for item in group.ContentSequence
             if item.ConceptNameCodeSequence[0].CodeValue == tracking_identifier)
        for group in _measurement_groups(summary)
    ]  # fmt: skip
    assert identifiers == [GRADE_TRACKING_ID, "liverfat liver"]
    assert _report(summary).get_planar_roi_measurement_groups() == []


def _evaluations(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[tuple[str, str], tuple[str, str]]:
    """Concept -> value of every qualitative evaluation (group-level CONTAINS CODE item but the finding type)."""
    return {
        (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptNameCodeSequence[0].CodingSchemeDesignator): (
            item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator)
        for item in group[0].ContentSequence
        if item.ValueType == "CODE" and item.RelationshipType == "CONTAINS"
        and item.ConceptNameCodeSequence[0].CodeValue != "121071"
    }  # fmt: skip


QUESTION = ("MODSEV-STEATOSIS", "99LIVERFAT")
CERTAINTY = ("111012", "DCM")


@pytest.mark.parametrize(
    ("liver_hu", "grade", "value", "words", "title"),
    [
        (25.0, Grade.MODERATE_TO_SEVERE, ("52101004", "SCT"), "Moderate-to-severe hepatic steatosis: ",
         ("SUMMARY-MODSEV", "Liver attenuation: moderate-to-severe steatosis")),
        (60.0, Grade.NONE_OR_MILD, ("260415000", "SCT"), "Moderate-to-severe hepatic steatosis not shown: ",
         ("SUMMARY-NOTSHOWN", "Liver attenuation: moderate-to-severe steatosis not shown")),
    ],
)  # fmt: skip
def test_grade_is_coded_as_what_the_method_says_with_threshold_and_readable_text(
    tmp_path: Path, liver_hu: float, grade: Grade, value: tuple[str, str], words: str, title: tuple[str, str]
) -> None:
    """Present below the threshold, Not detected above it (never "Absent": mild is not excluded); the title says so."""
    series, liver = phantom_series(tmp_path / "ct", liver_hu=liver_hu)
    result = make_result(series, liver)
    assert result.grade is grade and not result.borderline
    summary = summary_of(series, result, tmp_path)
    assert _title(summary) == (*title, codes.LIVERFAT_SCHEME)
    group = _grade_group(summary)
    assert _code(group.finding_type) == ("197321007", "SCT")
    assert _evaluations(group) == {QUESTION: value}  # no borderline flag, no severity beside a negative
    (evaluation,) = [item for item in group[0].ContentSequence
                     if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == QUESTION[0]]
    assert evaluation.ConceptNameCodeSequence[0].CodeMeaning == "Moderate-to-severe hepatic steatosis"
    assert "ContentSequence" not in evaluation
    parenchymal, axial, threshold = group.get_measurements()
    assert _code(parenchymal.method) == _code(codes.DL_PARENCHYMAL)
    assert parenchymal.value == pytest.approx(result.graded_hu, abs=0.01)
    assert _code(axial.method) == _code(codes.DL_AXIAL)
    assert (_code(threshold.name), _code(threshold.unit), threshold.value) == (
        ("112032", "DCM"), ("[hnsf'U]", "UCUM"), 40.0)
    summary = _texts(group)["Summary"]
    assert summary == [grade_sentence(result)]
    assert summary[0].startswith(words) and f"{result.graded_hu:.1f} HU" in summary[0]
    assert "borderline" not in summary[0]
    assert _text_values(group, "111002") == ["threshold_hu=40", "borderline_margin_hu=2.41"]


@pytest.mark.parametrize(("graded_hu", "value"), [(41.3, ("260415000", "SCT")), (38.2, ("52101004", "SCT"))])
def test_borderline_value_is_coded_equivocal_and_said_in_the_grade_sentence(
    graded: Graded, tmp_path: Path, graded_hu: float, value: tuple[str, str]
) -> None:
    series, result, _, _, _ = graded
    near = borderline(result, graded_hu)
    assert near.borderline
    group = _grade_group(summary_of(series, near, tmp_path))
    assert _evaluations(group) == {QUESTION: value, CERTAINTY: ("42425007", "SCT")}
    (sentence,) = _texts(group)["Summary"]
    assert sentence.endswith(
        f"{graded_hu:.1f} HU{' (< 40 HU)' if graded_hu < 40 else ' (threshold < 40 HU; mild steatosis not excluded)'}"
        ", within 2.41 HU of the 40 HU threshold: borderline, review the image."
    )


def test_value_just_outside_the_margin_is_not_borderline(graded: Graded, tmp_path: Path) -> None:
    series, result, _, _, _ = graded
    clear = borderline(result, 42.5)
    assert not clear.borderline
    group = _grade_group(summary_of(series, clear, tmp_path))
    assert CERTAINTY not in _evaluations(group)
    assert "borderline" not in _texts(group)["Summary"][0]


def test_replaced_rois_show_the_graded_value_beside_the_seed_exact_one_and_the_basis(
    graded: Graded, tmp_path: Path
) -> None:
    series, result, _, _, _ = graded
    replaced = with_replaced_roi(borderline(result, 43.0), shift_hu=-6.0)
    assert replaced.graded_hu == pytest.approx(37.0) and replaced.parenchymal_hu == pytest.approx(43.0)
    group = _grade_group(summary_of(series, replaced, tmp_path))
    graded_value, seed_exact, _, _ = group.get_measurements()
    assert (_code(graded_value.method), graded_value.value) == (_code(codes.DL_PARENCHYMAL_REPLACED), 37.0)
    assert (_code(seed_exact.method), seed_exact.value) == (_code(codes.DL_PARENCHYMAL), 43.0)
    assert _evaluations(group) == {QUESTION: ("52101004", "SCT")}  # graded on 37.0 HU
    texts = _texts(group)
    assert texts["Summary"][0] == (
        "Moderate-to-severe hepatic steatosis: DL-parenchymal liver attenuation 37.0 HU with ROI 2 (next slice) "
        "as replacement (< 40 HU); seed-exact DL-parenchymal 43.0 HU."
    )
    assert texts["Comment"][:2] == [SITE.disclaimer, f"Grade basis: {replaced.grade_basis}"]


def test_graded_value_within_the_margin_with_replaced_rois_says_both(graded: Graded) -> None:
    _, result, _, _, _ = graded
    two = replace(with_replaced_roi(borderline(result, 43.0), shift_hu=-1.5, rule=RoiRule.SHIFTED),
                  rois=tuple(replace(roi, rule=RoiRule.SHIFTED) if roi.label != 2 else roi for roi in result.rois))
    assert two.borderline and two.graded_hu == pytest.approx(41.5)
    assert grade_sentence(two) == (
        "Moderate-to-severe hepatic steatosis not shown: DL-parenchymal liver attenuation 41.5 HU with ROI 1 (shifted), "
        "ROI 3 (shifted) as replacements (threshold < 40 HU; mild steatosis not excluded), within 2.41 HU of the 40 HU "
        "threshold: borderline, review the image; seed-exact DL-parenchymal 43.0 HU."
    )


def test_equal_graded_and_seed_values_give_one_dl_parenchymal_and_no_basis(graded: Graded) -> None:
    _, result, _, summary, _ = graded
    group = _grade_group(summary)
    methods = [_code(m.method) for m in group.get_measurements()]
    assert methods.count(_code(codes.DL_PARENCHYMAL)) == 1
    assert _code(codes.DL_PARENCHYMAL_REPLACED) not in methods
    assert not any(text.startswith("Grade basis") for text in _texts(group).get("Comment", []))
    assert "seed-exact" not in grade_sentence(result)


def test_summary_carries_the_sites_disclaimer_right_after_the_grade_sentence(graded: Graded) -> None:
    _, _, _, summary, _ = graded
    texts = [item for item in _grade_group(summary)[0].ContentSequence if item.ValueType == "TEXT"
             and item.ConceptNameCodeSequence[0].CodeValue in (codes.SUMMARY.value, codes.COMMENT.value)]  # fmt: skip
    assert [item.TextValue for item in texts[:2]] == [texts[0].TextValue, SITE.disclaimer]
    assert texts[0].ConceptNameCodeSequence[0].CodeMeaning == "Summary"


def test_another_disclaimer_is_carried_as_written(case: Case, tmp_path: Path) -> None:
    series, liver = case
    result = make_result(series, liver)
    site = OutputSettings(disclaimer="Nur für Forschung. Keine Diagnose.")
    uids = output_uids(result)
    build_summary_sr(series, result, None, uids, site, CREATED).save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert site.disclaimer in _texts(_grade_group(cast(SR, hd.sr.srread(tmp_path / "sr.dcm"))))["Comment"]


def test_both_reports_are_preliminary_unverified_and_complete(graded: Graded) -> None:
    """A machine result awaiting a radiologist's review, not a signed final report."""
    _, _, circles, summary, _ = graded
    for sr in (circles, summary):
        assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == ("PRELIMINARY", "UNVERIFIED", "COMPLETE")
        assert "VerifyingObserverSequence" not in sr


def test_grade_sentence_names_no_dicom_tags(case: Case) -> None:
    series, liver = case
    reason = Finding(Reason.SLICE_TOO_THICK, "SliceThickness 7.5 mm exceeds the 5 mm limit, see (0018,0050)")
    result = replace(not_graded(series, liver), reasons=(reason,))
    assert grade_sentence(result) == "Not graded: SliceThickness 7.5 mm exceeds the 5 mm limit."


@pytest.mark.parametrize(
    ("message", "plain"),
    [
        ("ContrastBolusAgentAdministered (0018,9342) is 'YES' in an item, see (0018,0012)",
         "ContrastBolusAgentAdministered is 'YES' in an item"),
        ("no header names a region (BodyPartExamined absent; see (0018,0015), (0008,1030)): look at the image",
         "no header names a region (BodyPartExamined absent): look at the image"),
        ("aorta 180 HU suggests contrast (limit 100 HU)", "aorta 180 HU suggests contrast (limit 100 HU)"),
    ],
)  # fmt: skip
def test_without_tags_removes_tag_numbers_and_keeps_the_words(message: str, plain: str) -> None:
    assert without_tags(message) == plain


def test_withheld_grade_is_undetermined_with_reasons_as_text(case: Case, tmp_path: Path) -> None:
    series, liver = case
    result = not_graded(series, liver)
    summary = summary_of(series, result, tmp_path)
    assert _title(summary) == ("SUMMARY-UNGRADED", "Liver attenuation: not graded", codes.LIVERFAT_SCHEME)
    group = _grade_group(summary)
    assert _evaluations(group) == {QUESTION: ("373068000", "SCT")}  # no borderline flag on a withheld grade
    methods = [_code(m.method) for m in group.get_measurements()]
    assert _code(codes.DL_PARENCHYMAL) in methods  # measured: the number is reported, no grade rests on it
    assert _code(codes.DL_PARENCHYMAL_REPLACED) not in methods
    texts = _texts(group)
    assert texts["Summary"][0].startswith("Not graded: aorta 180 HU")
    assert texts["Comment"] == [SITE.disclaimer, f"image_suggests_contrast: {result.reasons[0].message}"]


def test_withheld_grade_stays_undetermined_even_near_the_threshold(case: Case, tmp_path: Path) -> None:
    series, liver = case
    result = replace(not_graded(series, liver), graded_hu=40.5, borderline=True)
    group = _grade_group(summary_of(series, result, tmp_path))
    assert _evaluations(group) == {QUESTION: ("373068000", "SCT")}
    assert _texts(group)["Summary"][0].startswith("Not graded:")


def _library(sr: SR) -> set[str]:
    """The SOP Instance UIDs in the Image Library; empty without one."""
    return {entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for library in sr.ContentSequence if library.ConceptNameCodeSequence[0].CodeValue == "111028"
            for group in library.ContentSequence for entry in group.ContentSequence
            if "ReferencedSOPSequence" in entry}  # fmt: skip


def _title(sr: SR) -> tuple[str, str, str]:
    title = sr.ConceptNameCodeSequence[0]
    return (title.CodeValue, title.CodeMeaning, title.CodingSchemeDesignator)


def _evidence(sr: SR) -> set[str]:
    return {
        instance.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for referenced in study.ReferencedSeriesSequence
        for instance in referenced.ReferencedSOPSequence
    }


def test_both_reports_name_this_node_and_their_evidence_and_the_circles_their_slices(graded: Graded) -> None:
    """OHIF needs the circle report's Image Library; the summary cites no slice and has none (OHIF would print
    one "[IMAGE is not supported]" per entry above the grade)."""
    series, result, circles, summary, seg = graded
    roi_slices = {series.datasets[roi.slice_index].SOPInstanceUID for roi in result.rois}
    ct = {ds.SOPInstanceUID for ds in series.datasets}
    assert (_library(circles), _library(summary)) == (roi_slices, set())
    for sr, evidence in ((circles, ct), (summary, ct | {seg.SOPInstanceUID})):
        (observer,) = _report(sr).get_observer_contexts(observer_type=dcm_codes.DCM.Device)
        attributes = observer.observer_identifying_attributes
        assert (attributes.uid, attributes.name) == ("2.25.1234", "LIVERFAT-TEST")
        assert _evidence(sr) == evidence
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        assert sr.StudyInstanceUID == series.datasets[0].StudyInstanceUID
        assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == codes.LIVERFAT_SCHEME
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_circle_report_is_an_imaging_measurement_report_and_the_summary_is_titled_by_its_outcome(
    graded: Graded,
) -> None:
    """OHIF draws a 126000 report's circles and shows a report with any other title as text, title first."""
    _, result, circles, summary, _ = graded
    assert _title(circles) == ("126000", "Imaging Measurement Report", "DCM")
    title = summary_title(result)
    assert _title(summary) == (title.value, title.meaning, codes.LIVERFAT_SCHEME)  # the outcome's: see below
    assert (circles.SeriesNumber, circles.SeriesDescription) == (9902, "liverfat ROI measurements")
    assert (summary.SeriesNumber, summary.SeriesDescription) == (9904, "liverfat steatosis summary")
    assert circles.SeriesInstanceUID != summary.SeriesInstanceUID
    assert circles.SOPInstanceUID != summary.SOPInstanceUID


def _group_numbers(sr: SR) -> list[Dataset]:
    return [item for group in _measurement_groups(sr) for item in group.ContentSequence if item.ValueType == "NUM"]


def test_every_group_level_num_item_has_children_as_ohif_expects(graded: Graded) -> None:
    """OHIF reads each measurement's ContentSequence without checking that it exists."""
    _, _, circles, summary, _ = graded
    numbers = _group_numbers(circles) + _group_numbers(summary)
    assert len(numbers) == 3 * 2 + 3 + 2
    assert all(len(item.get("ContentSequence", [])) > 0 for item in numbers)


def test_user_mask_liver_group_names_no_algorithm(case: Case, tmp_path: Path) -> None:
    series, liver = case
    result = replace(make_result(series, liver), model=USER_MASK)
    (group,) = _report(summary_of(series, result, tmp_path)).get_volumetric_roi_measurement_groups()
    assert _text_values(group, ALGORITHM_NAME) == []


def test_result_without_rois_has_a_summary_without_images_and_no_circle_report(case: Case) -> None:
    series, liver = case
    result = replace(not_graded(series, liver), rois=())
    uids = output_uids(result)
    with pytest.raises(ValueError, match="no ROIs"):
        build_circle_sr(series, result, uids, SITE, CREATED)
    summary = build_summary_sr(series, result, None, uids, SITE, CREATED)
    assert [item.ConceptNameCodeSequence[0].CodeValue for item in summary.ContentSequence
            if item.ValueType == "CONTAINER"] == ["126010"]  # no Image Library  # fmt: skip
    (group,) = _measurement_groups(summary)
    assert [item for item in group.ContentSequence if item.ValueType == "IMAGE"] == []


def test_place_circle_uses_half_pixel_image_coordinates_on_the_nearest_slice(case: Case) -> None:
    series, _ = case
    k = 7
    dataset = series.datasets[k]
    position = np.asarray([float(v) for v in dataset.ImagePositionPatient])
    cosines = np.asarray([float(v) for v in dataset.ImageOrientationPatient]).reshape(2, 3)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    centre = position + 10 * column_spacing * cosines[0] + 20 * row_spacing * cosines[1] + 0.4 * np.cross(*cosines)
    circle = place_circle(series.datasets, tuple(centre), radius_mm=2 * column_spacing)
    assert circle.slice_index == k
    assert circle.centre == pytest.approx((10.5, 20.5))
    assert circle.radius_px == pytest.approx(2.0)
    assert circle.off_plane_mm == pytest.approx(0.4)


def _placed_slice_by_slice(datasets: tuple[Dataset, ...], centre: tuple[float, float, float]) -> tuple[int, float]:
    """The nearest slice and the off-plane distance as highdicom's transformer gives them, one slice at a time."""
    found = []
    for k, dataset in enumerate(datasets):
        transformer = hd.spatial.ReferenceToImageTransformer(
            image_position=[float(v) for v in dataset.ImagePositionPatient],
            image_orientation=[float(v) for v in dataset.ImageOrientationPatient],
            pixel_spacing=[float(v) for v in dataset.PixelSpacing],
        )
        off_plane = float(transformer(np.asarray([centre]))[0][2])
        found.append((abs(off_plane), k, off_plane))
    _, k, off_plane = min(found)
    return k, off_plane


def test_place_circle_finds_the_slice_a_per_slice_transformer_search_finds(case: Case) -> None:
    series, _ = case
    first = np.asarray([float(v) for v in series.datasets[0].ImagePositionPatient])
    last = np.asarray([float(v) for v in series.datasets[-1].ImagePositionPatient])
    rng = np.random.default_rng(14)
    centres = [first + t * (last - first) + rng.uniform(-50, 50, 3) * [1, 1, 0] for t in rng.uniform(-0.1, 1.1, 20)]
    for centre in centres:
        circle = place_circle(series.datasets, tuple(centre), radius_mm=5.0)
        assert (circle.slice_index, circle.off_plane_mm) == _placed_slice_by_slice(series.datasets, tuple(centre))


def test_place_circle_midway_between_two_slices_takes_the_first(case: Case) -> None:
    series, _ = case
    k = 4
    position = np.asarray([float(v) for v in series.datasets[k].ImagePositionPatient])
    following = np.asarray([float(v) for v in series.datasets[k + 1].ImagePositionPatient])
    centre = tuple((position + following) / 2)
    circle = place_circle(series.datasets, centre, radius_mm=5.0)
    assert circle.slice_index == _placed_slice_by_slice(series.datasets, centre)[0] == k


def test_place_circles_places_each_roi_as_place_circle_does(graded: Graded) -> None:
    series, result, _, _, _ = graded
    singly = [place_circle(series.datasets, roi.centre_lps, roi.radius_mm) for roi in result.rois]
    assert place_circles(series.datasets, result.rois) == singly


def test_warnings_of_a_graded_result_are_listed_as_comments(case: Case, tmp_path: Path) -> None:
    series, liver = case
    warning = Finding(Reason.ROI_ON_VESSEL, "ROI 2 mean 20 HU above the other two")
    result = replace(make_result(series, liver), warnings=(warning,))
    group = _grade_group(summary_of(series, result, tmp_path))
    assert _texts(group)["Comment"] == [SITE.disclaimer, "roi_on_vessel: ROI 2 mean 20 HU above the other two"]


@pytest.mark.parametrize(("rule", "suffix"), [(RoiRule.NEXT_SLICE, " (next slice)"), (RoiRule.SHIFTED, " (shifted)")])
def test_replaced_roi_says_so_in_its_label_and_keeps_its_tracking_uid(
    graded: Graded, tmp_path: Path, rule: RoiRule, suffix: str
) -> None:
    series, result, _, _, _ = graded
    replaced = with_replaced_roi(result, label=2, rule=rule)
    circles = written(series, replaced, tmp_path)[0]
    uids = output_uids(replaced)
    groups = _report(circles).get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [
        "liverfat liver ROI 1", f"liverfat liver ROI 2{suffix}", "liverfat liver ROI 3"]
    assert [g.tracking_uid for g in groups] == [uids.tracking(roi_tracking_id(label)) for label in (1, 2, 3)]
