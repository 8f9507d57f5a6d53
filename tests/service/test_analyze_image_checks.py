"""Image checks in ``liverfat analyze`` and the node: not a CT (label maps, masks, SEG) and the body
region decided from the image when no header names it. Phantoms first, then the real data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from liverfat.analysis import AnalysisOptions, ModelCache, Outcome, SeriesReport
from liverfat.dicom_io.eligibility import EligibilityPolicy, check_eligibility
from liverfat.dicom_io.read import discover, load_series
from liverfat.errors import Reason
from liverfat.inference.backend import Backend
from liverfat.inference.image_checks import MIN_LUNG_VOLUME_ML, not_ct_finding, region_evidence, region_finding
from liverfat.service.cli import main
from liverfat.service.research import ResearchRun, analyze_inputs
from liverfat.service.spool import JobState
from liverfat.service.worker import process_job
from tests.chest_phantom import CHEST_GRID, ChestPhantom
from tests.phantom import Grid, Phantom, SeriesHeader, render_volume, write_series
from tests.service.conftest import node_config
from tests.service.fake_backend import PhantomLiverBackend
from tests.service.test_worker import spool_series

SILENT = SeriesHeader(study_description="", series_description="", protocol_name="", body_part=None)
ABDOMEN_GRID = Grid(rows=64, columns=64, pixel_spacing_mm=5.6, slice_positions_mm=tuple(np.arange(-100.0, 40.1, 5.0)))
# Every attribute the eligibility policy reads for the body region
REGION_ATTRIBUTES = ("BodyPartExamined", "AnatomicRegionSequence", *EligibilityPolicy().description_tags)


def no_model() -> Backend:
    raise AssertionError("the segmentation model must not be loaded for this input")


def analyze(inputs: list[Path], out: Path, *, force: bool = False, mask: Path | None = None) -> list[SeriesReport]:
    options = AnalysisOptions(out_dir=out, ignore_eligibility=force, mask=mask, write_dicom=False)
    return analyze_inputs(inputs, ResearchRun(options), no_model).reports


def codes(report: SeriesReport) -> list[str]:
    return [r.code.value for r in report.result.reasons]


@pytest.fixture(scope="module")
def chest_mask(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chest phantom's liver as a NIfTI mask (``--mask``), so no model is needed."""
    _, liver = render_volume(ChestPhantom(), CHEST_GRID)
    path = tmp_path_factory.mktemp("mask") / "liver.nii.gz"
    sitk.WriteImage(liver.with_array(liver.array.astype(np.uint8)).to_sitk(), str(path))
    return path


# --- phantoms -----------------------------------------------------------------------------------------
def test_chest_with_silent_headers_is_accepted_from_the_image_with_the_evidence(
        tmp_path: Path, chest_mask: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_series(tmp_path / "ct", ChestPhantom().with_liver_hu(32.0), CHEST_GRID, SILENT)[0].parent
    assert main(["check", str(folder)]) == 0
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["eligible"] is True and [p["code"] for p in line["pending"]] == ["region_from_image"]
    [report] = analyze([folder], tmp_path / "out", mask=chest_mask)
    assert report.outcome is Outcome.PROCESSED and report.result.eligible and codes(report) == []
    assert report.result.grade.value == "moderate-to-severe"
    [warning] = [w for w in report.result.warnings if w.code is Reason.REGION_FROM_IMAGE]
    assert "the image shows a chest down to the liver dome: lung volume" in warning.message
    saved = json.loads((report.outputs[0]).read_text())
    assert "region_from_image" in [w["code"] for w in saved["warnings"]]


def test_abdomen_with_silent_headers_is_rejected_from_the_image_and_force_measures_without_a_grade(
        tmp_path: Path) -> None:
    folder = write_series(tmp_path / "ct", Phantom(), ABDOMEN_GRID, SILENT)[0].parent
    _, liver = render_volume(Phantom(), ABDOMEN_GRID)
    mask = tmp_path / "liver.nii.gz"
    sitk.WriteImage(liver.with_array(liver.array.astype(np.uint8)).to_sitk(), str(mask))
    [rejected] = analyze([folder], tmp_path / "out", mask=mask)
    assert rejected.outcome is Outcome.REJECTED and codes(rejected) == ["not_chest"]
    assert "lung volume 0 ml in the field of view" in rejected.result.reasons[0].message
    assert f"a chest CT shows at least {MIN_LUNG_VOLUME_ML:.0f} ml" in rejected.result.reasons[0].message
    [forced] = analyze([folder], tmp_path / "forced", mask=mask, force=True)
    assert forced.outcome is Outcome.PROCESSED and not forced.result.eligible
    assert forced.result.grade.value == "not-graded" and codes(forced)[0] == "not_chest"
    assert forced.result.parenchymal_hu is not None


def test_a_header_naming_another_region_is_rejected_without_reading_the_image(tmp_path: Path) -> None:
    head = SeriesHeader(study_description="CT HEAD WO", series_description="", protocol_name="", body_part=None)
    folder = write_series(tmp_path / "ct", ChestPhantom(), CHEST_GRID, head)[0].parent
    [report] = analyze([folder], tmp_path / "out")
    assert report.outcome is Outcome.REJECTED and codes(report) == ["not_chest"]
    assert "no body part or description says chest" in report.result.reasons[0].message


def test_a_nifti_label_map_is_refused_before_the_model_runs(tmp_path: Path) -> None:
    ct, liver = render_volume(Phantom(), ABDOMEN_GRID)
    labels = liver.with_array(np.where(ct.array > -500, 1, 0).astype(np.uint8) + liver.array.astype(np.uint8) * 4)
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(labels.to_sitk(), str(path))
    [report] = analyze([path], tmp_path / "out")
    assert report.outcome is Outcome.REJECTED and "not_ct_image" in codes(report)
    assert report.result.grade.value == "not-graded" and report.result.parenchymal_hu is None


def test_a_mask_stored_as_ct_images_is_refused_even_when_forced(tmp_path: Path) -> None:
    folder = write_series(tmp_path / "ct", _MaskPhantom(), ABDOMEN_GRID)[0].parent
    [report] = analyze([folder], tmp_path / "out", force=True)
    assert report.outcome is Outcome.REJECTED and codes(report) == ["not_ct_image"]
    assert "only 2 distinct values" in report.result.reasons[0].message


class _MaskPhantom(Phantom):
    """The liver as 0/1 'HU': what a mask exported as CT images looks like."""

    def hu_at(self, lps: np.ndarray) -> np.ndarray:
        return self.liver_at(lps).astype(np.float32)


# --- the node (the worker runs the same path) -----------------------------------------------------------
@pytest.mark.slow
def test_node_accepts_a_chest_from_the_image_and_refuses_a_mask_stored_as_ct(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    models = ModelCache(PhantomLiverBackend.loader())
    chest = write_series(tmp_path / "chest", ChestPhantom().with_liver_hu(32.0), CHEST_GRID, SILENT)
    spool, job = spool_series(config, chest)
    result = process_job(job, spool, config, models)
    assert result.state is JobState.DONE and spool.job(job.id).grade == "moderate-to-severe"
    [saved] = (spool.results_dir / str(job.id)).glob("*/result.json")
    assert "region_from_image" in [w["code"] for w in json.loads(saved.read_text())["warnings"]]
    mask = write_series(tmp_path / "mask", _MaskPhantom(), ABDOMEN_GRID)
    spool, job = spool_series(config, mask)
    result = process_job(job, spool, config, models)
    assert result.state is JobState.REJECTED and [r["code"] for r in result.reasons] == ["not_ct_image"]


# --- real data ----------------------------------------------------------------------------------------
def _copy_without_region(source: Path, target: Path, keep: int | None = None) -> Path:
    """The series' DICOM files with every region-naming attribute removed; ``keep`` lowest slices only."""
    files = sorted(p for p in source.rglob("*") if p.is_file() and pydicom.misc.is_dicom(p))
    datasets = sorted((pydicom.dcmread(p) for p in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    target.mkdir(parents=True)
    for ds in datasets[:keep]:
        for keyword in REGION_ATTRIBUTES:
            ds.pop(keyword, None)
        ds.save_as(target / f"{ds.SOPInstanceUID}.dcm")
    return target


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["example_seg.nii.gz", "example_seg_fast_liver.nii.gz"])
def test_totalsegmentator_label_maps_are_refused_as_not_ct_images(shared_data: Path, tmp_path: Path, name: str) -> None:
    [report] = analyze([shared_data / "totalsegmentator-example" / name], tmp_path / "out")
    assert report.outcome is Outcome.REJECTED and "not_ct_image" in codes(report)
    assert report.result.grade.value == "not-graded"
    message = next(r.message for r in report.result.reasons if r.code is Reason.NOT_CT_IMAGE)
    assert "0.0% of voxels below -500 HU" in message and "label map" in message


@pytest.mark.shared_data
def test_totalsegmentator_ct_next_to_its_label_map_is_still_a_ct(shared_data: Path) -> None:
    from liverfat.dicom_io.read import read_nifti

    assert not_ct_finding(read_nifti(shared_data / "totalsegmentator-example" / "example_ct_sm.nii.gz").volume) is None


@pytest.mark.shared_data
def test_a_dicom_seg_given_as_input_is_refused_with_its_sop_class(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["analyze", str(shared_data / "misc-dicom" / "liver.dcm"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no CT series found" in err and "'Segmentation Storage'" in err and "is not a CT image" in err
    [skipped] = json.loads((out / "skipped.json").read_text())
    assert skipped["reasons"][0]["code"] == "not_ct"


@pytest.mark.shared_data
def test_a_real_chest_without_region_headers_is_accepted_from_the_image(shared_data: Path, tmp_path: Path) -> None:
    folder = _copy_without_region(shared_data / "chest-ct" / "lung-pet-ct-dx-a0001", tmp_path / "ct")
    [files] = discover([folder]).series
    decision = check_eligibility(files.headers)
    assert decision.eligible and decision.region_from_image
    volume = load_series(files).volume
    assert not_ct_finding(volume) is None
    evidence = region_evidence(volume)
    assert evidence.lung_volume_ml > 4000 and evidence.shows_liver_dome  # measured 5,252 ml and 60 mm
    assert region_finding(volume).code is Reason.REGION_FROM_IMAGE


@pytest.mark.shared_data
@pytest.mark.parametrize(("keep", "lung_ml"), [(None, (400, 800)), (90, (0, 50))])
def test_a_real_abdomen_without_region_headers_is_rejected_from_the_image(
        shared_data: Path, tmp_path: Path, keep: int | None, lung_ml: tuple[float, float]) -> None:
    """3D-IRCADb-01: 129 slices of abdomen from just above the liver dome (its lung bases, 588 ml),
    and its lowest 90 slices (14 cm of abdomen below the lungs)."""
    folder = _copy_without_region(shared_data / "3dircadb-1.1" / "PATIENT_DICOM", tmp_path / "ct", keep)
    [report] = analyze([folder], tmp_path / "out")
    assert report.outcome is Outcome.REJECTED and codes(report) == ["not_chest"]
    message = report.result.reasons[0].message
    lung = float(message.split("lung volume ")[1].split(" ml")[0])
    assert lung_ml[0] <= lung <= lung_ml[1], message
    assert "does not show the lungs" in message


@pytest.mark.shared_data
def test_a_real_liver_mask_stored_as_ct_images_is_refused_as_not_ct(shared_data: Path, tmp_path: Path) -> None:
    [report] = analyze([shared_data / "3dircadb-1.1" / "MASKS_DICOM" / "liver"], tmp_path / "out")
    assert report.outcome is Outcome.REJECTED and codes(report) == ["not_ct_image"]
    assert "values 0 to 255 in 2 distinct levels" in report.result.reasons[0].message


@pytest.mark.slow
@pytest.mark.shared_data
def test_a_real_chest_without_region_headers_is_graded_by_the_default_model(shared_data: Path, tmp_path: Path) -> None:
    folder = _copy_without_region(shared_data / "chest-ct" / "lung-pet-ct-dx-a0001", tmp_path / "ct")
    out = tmp_path / "out"
    assert main(["analyze", str(folder), "--out", str(out), "--model", "default", "--device", "cpu",
                 "--no-dicom"]) == 0  # fmt: skip
    [saved] = out.glob("*/result.json")
    result = json.loads(saved.read_text())
    assert result["status"] == "processed" and result["eligible"] is True
    assert result["grade"] in ("none-or-mild", "moderate-to-severe") and result["parenchymal_hu"] is not None
    assert "region_from_image" in [w["code"] for w in result["warnings"]]


def test_series_without_study_uid_is_rejected_with_its_reason_and_no_not_applicable_sr(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "in", Phantom(), ABDOMEN_GRID)
    for path in paths:
        dataset = pydicom.dcmread(path)
        del dataset.StudyInstanceUID
        dataset.save_as(path)
    options = AnalysisOptions(out_dir=tmp_path / "out", not_applicable_sr=True)

    (report,) = analyze_inputs([tmp_path / "in"], ResearchRun(options), no_model).reports

    assert report.outcome is Outcome.REJECTED and codes(report) == ["missing_attribute"]
    assert "Study Instance UID" in report.result.reasons[0].message
    assert [path.name for path in report.outputs] == ["result.json"]
