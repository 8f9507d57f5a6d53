"""The product on the scans it exists for: real, whole, unenhanced chest CTs in ../shared/data/chest-ct.

Run the way ``liverfat analyze`` runs them (header filter, image checks, the default model, ROIs,
checks, grade). Figures measured at the commit that added this file are in each test's comments and
in README's validation table (``bench/validate.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from liverfat.analysis import AnalysisOptions, ModelCache, Outcome, SeriesReport, analyze_dicom_series
from liverfat.dicom_io.read import discover, read_mask
from liverfat.errors import Reason
from liverfat.inference.models.registry import load_backend
from liverfat.result import Grade

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

LIDC_MANUAL_ROI_HU = 69.21  # the radiologist's liver ROI, seed CSV Liver_attenuation_ROI_vs_seg_all_manual_n_1014
SEED_MAE_HU = 2.41  # the seed's DL-parenchymal vs manual ROI mean absolute difference (615 scans)


@pytest.fixture(scope="module")
def models() -> ModelCache:
    return ModelCache(lambda: load_backend("default", device="cpu"))


def run(folder: Path, models: ModelCache, tmp_path: Path) -> SeriesReport:
    (series,) = discover([folder]).series
    return analyze_dicom_series(series, AnalysisOptions(out_dir=tmp_path, write_dicom=False), models)


def test_lidc_idri_0002_is_graded_within_the_seed_error_of_the_manual_roi(
    shared_data: Path, models: ModelCache, tmp_path: Path
) -> None:
    report = run(shared_data / "chest-ct" / "lidc-idri-0002", models, tmp_path)
    result = report.result
    assert report.outcome is Outcome.PROCESSED
    assert result.grade is Grade.NONE_OR_MILD and not result.borderline
    assert result.graded_hu is not None
    assert abs(result.graded_hu - LIDC_MANUAL_ROI_HU) <= SEED_MAE_HU  # measured 70.2 HU (+1.0)
    assert result.working_masks is not None
    mask = result.working_masks.liver
    reference = read_mask(shared_data / "seed-dl-parenchymal" / "LIDC-IDRI_0002_3d_liver_seg.nii.gz", mask)
    ours, theirs = mask.array.astype(bool), reference.array.astype(bool)
    dice = 2 * np.count_nonzero(ours & theirs) / (np.count_nonzero(ours) + np.count_nonzero(theirs))
    # measured 0.945 (0.931 before the liver-centred second pass); the target 0.96 is not reached
    # by the default network: it draws the boundary ~2 mm into the abdominal wall on unenhanced CT
    assert dice >= 0.94


def test_lung_pet_ct_dx_a0001_5_mm_series_is_graded(shared_data: Path, models: ModelCache, tmp_path: Path) -> None:
    report = run(shared_data / "chest-ct" / "lung-pet-ct-dx-a0001", models, tmp_path)
    assert report.outcome is Outcome.PROCESSED
    assert report.result.grade is not Grade.NOT_GRADED, report.result.reasons
    assert report.result.graded_hu is not None and 40.0 < report.result.graded_hu < 70.0  # measured 51.4 HU


def test_lung_pet_ct_dx_a0002_8_mm_series_is_rejected_for_its_slice_thickness_only(
    shared_data: Path, models: ModelCache, tmp_path: Path
) -> None:
    report = run(shared_data / "chest-ct" / "lung-pet-ct-dx-a0002", models, tmp_path)
    assert report.outcome is Outcome.REJECTED
    assert [finding.code for finding in report.result.reasons] == [Reason.SLICE_TOO_THICK]
