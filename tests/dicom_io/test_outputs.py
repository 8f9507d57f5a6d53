"""write_outputs: four valid objects (dciodvfy), new series of the source study, deterministic UIDs, what was written."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from highdicom import _standard_utils as standard
from pydicom.filereader import read_file_meta_info

from liverfat.dicom_io.outputs import WrittenFile, warm_up, write_outputs
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.site import OutputSettings
from liverfat.errors import Finding, LiverfatError, Reason
from liverfat.result import AnalysisResult, Grade, Masks
from tests.dicom_io.output_cases import (
    borderline,
    dciodvfy_available,
    dciodvfy_errors,
    ircadb_series,
    make_result,
    not_graded,
    phantom_series,
    with_replaced_roi,
)

CREATED = datetime(2024, 5, 6, 7, 8, 9)
FILES = ("seg.dcm", "sr.dcm", "sr-summary.dcm", "keyimage.dcm")
DESCRIPTIONS = {
    "seg.dcm": "liverfat liver SEG",
    "sr.dcm": "liverfat ROI measurements",
    "sr-summary.dcm": "liverfat steatosis summary",
    "keyimage.dcm": "liverfat key image",
}


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[CTSeries, np.ndarray, AnalysisResult]:
    series, liver = phantom_series(tmp_path_factory.mktemp("ct"))
    return series, liver, make_result(series, liver)


@pytest.fixture(scope="module")
def written(case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    series, _, result = case
    return _write(series, result, tmp_path_factory.mktemp("out"), created_at=CREATED)


def _write(series: CTSeries, result: AnalysisResult, folder: Path, **options: Any) -> list[Path]:
    return [written.path for written in write_outputs(series, result, folder, **options)]


def _uids(paths: list[Path]) -> list[tuple[str, str]]:
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    return [(dataset.SeriesInstanceUID, dataset.SOPInstanceUID) for dataset in datasets]


def test_four_objects_join_the_source_study_as_one_new_series_each(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], written: list[Path]
) -> None:
    series, _, _ = case
    assert [path.name for path in written] == list(FILES)
    source = series.datasets[0]
    datasets = [pydicom.dcmread(path, stop_before_pixels=True) for path in written]
    for path, dataset in zip(written, datasets):
        for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "AccessionNumber", "SpecificCharacterSet", "StudyDate", "StudyTime", "StudyID"):
            assert dataset[keyword].value == source[keyword].value, (path.name, keyword)
        assert dataset.SeriesDescription == DESCRIPTIONS[path.name]
        assert dataset.SeriesInstanceUID.startswith("2.25.") and dataset.SOPInstanceUID.startswith("2.25.")
    series_uids = {dataset.SeriesInstanceUID for dataset in datasets}
    assert len(series_uids) == 4 and source.SeriesInstanceUID not in series_uids
    assert sorted(int(dataset.SeriesNumber) for dataset in datasets) == [9901, 9902, 9903, 9904]


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (Debian package dicom3tools) is not installed")
@pytest.mark.parametrize("name", FILES)
def test_phantom_outputs_have_no_dciodvfy_errors(written: list[Path], name: str) -> None:
    (path,) = [p for p in written if p.name == name]
    assert dciodvfy_errors(path) == []


@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_not_graded_outputs_have_no_dciodvfy_errors(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path: Path
) -> None:
    series, liver, _ = case
    for path in _write(series, not_graded(series, liver), tmp_path, created_at=CREATED):
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.slow
@pytest.mark.skipif(not dciodvfy_available(), reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_real_series_outputs_have_no_dciodvfy_errors_and_the_seg_round_trips(shared_data: Path, tmp_path: Path) -> None:
    import highdicom as hd

    series, liver = ircadb_series(shared_data)
    result = make_result(series, liver, roi_offsets=(-3, 0, 3))
    paths = _write(series, result, tmp_path, created_at=CREATED)
    assert [path.name for path in paths] == list(FILES)
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name
    # a borderline grade on a replaced ROI: every flag and label the outputs can carry
    flagged = with_replaced_roi(borderline(result, 43.0), shift_hu=-2.0)
    for path in _write(series, flagged, tmp_path / "flagged", created_at=CREATED):
        assert dciodvfy_errors(path) == [], f"flagged {path.name}"
    seg = hd.seg.segread(paths[0])
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in series.datasets],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )[..., 0]
    np.testing.assert_array_equal(masks.astype(bool), liver)


VARIANTS = {
    "present": lambda series, liver, r: borderline(r, 30.0),
    "not shown": lambda series, liver, r: r,
    "undetermined": lambda series, liver, r: not_graded(series, liver),
    "borderline": lambda series, liver, r: borderline(r, 41.3),
    "replaced ROI": lambda series, liver, r: with_replaced_roi(borderline(r, 43.0)),
}
VALUES = {"present": "52101004", "not shown": "260415000", "undetermined": "373068000", "borderline": "260415000",
          "replaced ROI": "52101004"}  # fmt: skip


def _summary_codes(sr: pydicom.Dataset) -> dict[str, str]:
    (measurements,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return {item.ConceptNameCodeSequence[0].CodeValue: item.ConceptCodeSequence[0].CodeValue
            for item in measurements.ContentSequence[0].ContentSequence
            if item.ValueType == "CODE" and item.RelationshipType == "CONTAINS"}  # fmt: skip


def _summary_texts(sr: pydicom.Dataset) -> list[str]:
    (measurements,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [item.TextValue for item in measurements.ContentSequence[0].ContentSequence if item.ValueType == "TEXT"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_kind_of_answer_is_valid_flagged_preliminary_and_carries_the_disclaimer(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path: Path, variant: str
) -> None:
    series, liver, result = case
    shown = VARIANTS[variant](series, liver, result)
    site = OutputSettings(disclaimer="Research use only. Not a diagnosis.")
    paths = {path.name: path for path in _write(series, shown, tmp_path, site=site, created_at=CREATED)}
    assert list(paths) == list(FILES)
    if dciodvfy_available():
        for path in paths.values():
            assert dciodvfy_errors(path) == [], path.name
    seg = pydicom.dcmread(paths["seg.dcm"], stop_before_pixels=True)
    assert seg.ContentDescription == site.disclaimer
    for name in ("sr.dcm", "sr-summary.dcm"):
        sr = pydicom.dcmread(paths[name])
        assert (sr.PreliminaryFlag, sr.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED"), name
    summary = pydicom.dcmread(paths["sr-summary.dcm"])
    assert _summary_codes(summary).get("MODSEV-STEATOSIS") == VALUES[variant]
    assert ("111012" in _summary_codes(summary)) is shown.borderline is (variant == "borderline")
    assert site.disclaimer in _summary_texts(summary)
    circles = pydicom.dcmread(paths["sr.dcm"])
    identifiers = [item.TextValue for item in circles.ContentSequence[-1].ContentSequence[1].ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeValue == "112039"]  # fmt: skip
    assert identifiers == [("liverfat liver ROI 2 (next slice)" if variant == "replaced ROI" else "liverfat liver ROI 2")]


def test_each_file_is_returned_with_the_file_meta_it_was_written_with_and_nothing_else_is_left(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path: Path
) -> None:
    series, _, result = case
    written = write_outputs(series, result, tmp_path / "out", created_at=CREATED)
    for record in written:
        meta = read_file_meta_info(record.path)
        assert record == WrittenFile(record.path, meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID,
                                     meta.TransferSyntaxUID)  # fmt: skip
        dataset = pydicom.dcmread(record.path, stop_before_pixels=True)
        assert (dataset.SOPClassUID, dataset.SOPInstanceUID) == (record.sop_class_uid, record.sop_instance_uid)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(FILES)  # no temporary files


def test_writing_the_same_result_twice_gives_identical_files(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], written: list[Path], tmp_path: Path
) -> None:
    series, _, result = case
    time.sleep(0.01)  # the clock moves on; nothing may depend on it
    again = _write(series, replace(result, timings_s={"total": 99.0}), tmp_path, created_at=CREATED)
    for first, second in zip(written, again):
        assert first.read_bytes() == second.read_bytes(), first.name


def test_uids_do_not_depend_on_the_time_of_writing(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], written: list[Path], tmp_path: Path
) -> None:
    series, _, result = case
    later = _write(series, result, tmp_path, created_at=datetime(2025, 1, 1))
    assert _uids(later) == _uids(written)


def _changed_masks(result: AnalysisResult) -> AnalysisResult:
    assert result.source_masks is not None
    liver = result.source_masks.liver.array.copy()
    k, j, i = np.argwhere(liver)[0]
    liver[k, j, i] = False
    return replace(result, source_masks=Masks(result.source_masks.liver.with_array(liver), result.source_masks.rois))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda r: replace(r, parenchymal_hu=r.parenchymal_hu + 0.1), id="parenchymal HU"),
        pytest.param(lambda r: replace(r, graded_hu=r.graded_hu + 0.1), id="graded HU"),
        pytest.param(lambda r: replace(r, borderline=True), id="borderline"),
        pytest.param(lambda r: replace(r, grade=Grade.NOT_GRADED), id="grade"),
        pytest.param(_changed_masks, id="one mask voxel"),
        pytest.param(lambda r: replace(r, software_version="9.9.9"), id="software version"),
        pytest.param(lambda r: replace(r, model=replace(r.model, version="2")), id="model version"),
    ],
)
def test_a_changed_result_gets_new_uids(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], written: list[Path], tmp_path: Path, change: object
) -> None:
    series, _, result = case
    changed = _write(series, change(result), tmp_path, created_at=CREATED)  # type: ignore[operator]
    before, after = _uids(written), _uids(changed)
    assert all(old[0] != new[0] and old[1] != new[1] for old, new in zip(before, after))


def test_other_site_settings_get_new_uids(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], written: list[Path], tmp_path: Path
) -> None:
    series, _, result = case
    other = _write(series, result, tmp_path, site=OutputSettings(disclaimer="Other words."), created_at=CREATED)
    assert all(old[1] != new[1] for old, new in zip(_uids(written), _uids(other)))


def test_without_liver_only_the_summary_report_and_key_image_are_written(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path: Path
) -> None:
    series, _, result = case
    reason = Finding(Reason.NO_LIVER, "no liver voxels found by the segmentation")
    empty = np.zeros(series.volume.array.shape)
    no_liver = replace(
        result, grade=Grade.NOT_GRADED, parenchymal_hu=None, volumetric_hu=None, axial_hu=None, liver_volume_ml=None,
        rois=(), reasons=(reason,),
        source_masks=Masks(
            series.volume.with_array(empty.astype(bool)), series.volume.with_array(empty.astype(np.uint8))
        ),
    )
    paths = _write(series, no_liver, tmp_path, created_at=CREATED)
    assert [path.name for path in paths] == ["sr-summary.dcm", "keyimage.dcm"]
    if dciodvfy_available():
        assert all(dciodvfy_errors(path) == [] for path in paths)


def test_a_series_without_dicom_source_is_refused(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path: Path
) -> None:
    series, _, result = case
    with pytest.raises(LiverfatError, match="no DICOM source") as caught:
        write_outputs(replace(series, datasets=()), result, tmp_path)
    assert caught.value.reason is Reason.NOT_DICOM


def test_a_result_of_another_series_is_refused(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path: Path
) -> None:
    series, _, result = case
    with pytest.raises(LiverfatError, match="Series Instance UID") as caught:
        write_outputs(series, replace(result, series_uid="1.2.3"), tmp_path)
    assert caught.value.reason is Reason.MASK_MISMATCH


def test_character_set_is_the_sources_unless_site_text_needs_utf8(
    case: tuple[CTSeries, np.ndarray, AnalysisResult], tmp_path: Path
) -> None:
    series, liver, _ = case
    source_names = [ds.PatientName for ds in series.datasets]
    try:
        for dataset in series.datasets:
            dataset.PatientName = "Müller^Jürgen"  # fits the phantom's ISO_IR 100
        result = make_result(series, liver)
        latin = _write(series, result, tmp_path / "latin", site=OutputSettings(institution_name="Klinikum Süd"))
        czech = _write(series, result, tmp_path / "utf8", site=OutputSettings(institution_name="Nemocnice Čáslav"))
    finally:
        for dataset, name in zip(series.datasets, source_names):
            dataset.PatientName = name
    for path in latin:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        assert (dataset.SpecificCharacterSet, dataset.PatientName) == ("ISO_IR 100", "Müller^Jürgen")
    for path in czech:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        assert (dataset.SpecificCharacterSet, dataset.PatientName) == ("ISO_IR 192", "Müller^Jürgen")
        assert dataset.InstitutionName == "Nemocnice Čáslav"
        if dciodvfy_available():
            assert dciodvfy_errors(path) == [], path.name


@pytest.mark.parametrize(
    ("setting", "value"),
    [("station_name", "A-STATION-NAME-LONGER-THAN-16"), ("manufacturer", ""), ("sr_series_number", 0),
     ("sr_summary_series_number", 2**31)],
)
def test_invalid_site_settings_are_refused(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=setting):
        OutputSettings(**{setting: value})  # type: ignore[arg-type]


def test_warm_up_loads_the_tables_highdicom_would_load_in_the_first_write() -> None:
    # highdicom's private table loaders: if a highdicom release stops filling them from a bare
    # SOP instance, the warm-up no longer spares the first series anything and this says so
    tables = (standard.get_sop_class_iod_map, standard.get_iod_module_map, standard.get_module_attribute_map)
    for table in tables:
        table.cache_clear()
    warm_up()
    assert [table.cache_info().currsize for table in tables] == [1, 1, 1]
