from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from liverfat import __version__
from liverfat.dicom_io.series import CTSeries
from liverfat.errors import Finding, LiverfatError, Reason
from liverfat.inference.grading import GradingConfig
from liverfat.inference.pipeline import AnalysisConfig, measure_series
from liverfat.inference.roi import MEDIAL_OFFSET_MM, RoiMode
from liverfat.result import USER_MASK, AnalysisResult, Grade, ModelInfo
from liverfat.volume import Volume
from tests.phantom import Grid, Phantom, render_volume, storage_variants

LIVER = Phantom().liver
# liver-centred source grid: 1.4 mm pixels, 2.5 mm slices covering the whole liver (z -60..60)
SOURCE = Grid(rows=128, columns=128, pixel_spacing_mm=1.4, centre=LIVER.centre,
              slice_positions_mm=tuple(np.arange(-65.0, 65.1, 2.5)))
STAGES = {"resample", "segment", "rois", "measure", "grade", "masks"}


@cache
def phantom_series(liver_hu: float = 55.0, variant: str = "head-first") -> tuple[CTSeries, Volume]:
    ct, liver = render_volume(Phantom().with_liver_hu(liver_hu), storage_variants(SOURCE)[variant])
    return CTSeries(volume=ct, series_uid=f"1.2.826.0.1.3680043.2.1125.{int(liver_hu)}", study_uid="1.2.3"), liver


def run(
    liver_hu: float = 55.0, variant: str = "head-first", config: AnalysisConfig = AnalysisConfig()
) -> AnalysisResult:
    series, liver = phantom_series(liver_hu, variant)
    return measure_series(series, liver, eligible=True, reasons=(), config=config)


class AnalyticLiverBackend:
    """A fake model: the phantom's analytic liver at the working grid's voxel centres."""

    info = ModelInfo(name="analytic-phantom", version="1")

    def predict(self, ct: Volume) -> Volume:
        nk, nj, ni = ct.array.shape
        k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
        return ct.with_array(LIVER.contains(ct.to_lps(np.stack([i, j, k], axis=-1))))


class WrongGridBackend(AnalyticLiverBackend):
    def predict(self, ct: Volume) -> Volume:
        return Volume(np.ones((2, 2, 2), dtype=bool), ct.spacing, ct.origin)


def test_rois_lie_21_mm_medial_of_the_lateral_liver_edge_on_three_slices_5_mm_apart() -> None:
    result = run()
    (cx, _, cz), (a, _, c) = LIVER.centre, LIVER.semi_axes
    assert [roi.label for roi in result.rois] == [1, 2, 3]
    assert [roi.z_mm for roi in result.rois] == pytest.approx([5.0, 0.0, -5.0])  # largest slice z = 0, cranial first
    for roi in result.rois:
        lateral_edge = cx - a * np.sqrt(1.0 - ((roi.z_mm - cz) / c) ** 2)
        # the resampled mask's edge lies within a source pixel (1.4 mm) of the analytic one
        assert roi.centre_lps[0] - MEDIAL_OFFSET_MM == pytest.approx(lateral_edge, abs=1.4)
        assert roi.n_voxels == 401
        assert roi.area_mm2 == pytest.approx(196.49)
        assert roi.inside_liver_fraction == 1.0
    assert result.warnings == ()


def test_result_carries_figures_provenance_timings_and_masks_on_both_grids() -> None:
    series, liver = phantom_series()
    result = run()
    assert result.parenchymal_hu == pytest.approx(55.0, abs=1.0)
    assert result.volumetric_hu == pytest.approx(55.0, abs=2.0)  # its rim blends with the 35 HU body
    assert result.axial_hu == pytest.approx(55.0, abs=2.0)
    assert result.liver_volume_ml == pytest.approx(4.0 / 3.0 * np.pi * np.prod(LIVER.semi_axes) / 1000.0, rel=0.02)
    assert result.model == USER_MASK and result.software_version == __version__
    assert set(result.timings_s) == STAGES and all(t >= 0.0 for t in result.timings_s.values())
    assert result.working_masks is not None and result.source_masks is not None
    assert result.working_masks.liver.same_grid(result.working_masks.rois)
    assert result.working_masks.liver.spacing == (0.7, 0.7, 2.5)
    source = result.source_masks
    assert source.liver.same_grid(series.volume) and source.rois.same_grid(series.volume)
    assert source.liver.array.dtype == bool and source.rois.array.dtype == np.uint8
    overlap = np.logical_and(source.liver.array, liver.array).sum()
    assert 2.0 * overlap / (source.liver.array.sum() + liver.array.sum()) > 0.98
    for roi in result.rois:
        k = int(round(series.volume.to_index(roi.centre_lps)[2]))
        assert np.flatnonzero((source.rois.array == roi.label).any(axis=(1, 2))).tolist() == [k]
    assert result.to_json()["grade"] == Grade.NONE_OR_MILD.value


@pytest.mark.parametrize("variant", ["feet-first", "rows-flipped", "columns-flipped", "transposed"])
def test_same_anatomical_rois_whatever_the_storage_order(variant: str) -> None:
    reference, result = run(), run(variant=variant)
    for roi, expected in zip(result.rois, reference.rois, strict=True):
        assert roi.label == expected.label
        assert np.linalg.norm(np.subtract(roi.centre_lps, expected.centre_lps)) <= 0.7  # one working pixel
    assert result.parenchymal_hu == pytest.approx(reference.parenchymal_hu, abs=1.0)


@pytest.mark.parametrize(("liver_hu", "expected"), [(35.0, Grade.MODERATE_TO_SEVERE), (45.0, Grade.NONE_OR_MILD)])
def test_grade_on_either_side_of_40_hu(liver_hu: float, expected: Grade) -> None:
    result = run(liver_hu)
    assert result.grade is expected and result.reasons == ()
    assert result.parenchymal_hu == pytest.approx(liver_hu, abs=1.0)
    assert result.threshold_hu == 40.0


@pytest.mark.parametrize(("liver_hu", "expected"), [(38.5, Grade.MODERATE_TO_SEVERE), (41.5, Grade.NONE_OR_MILD)])
def test_value_within_the_margin_of_40_hu_keeps_the_seed_grade_and_is_flagged_borderline(
    liver_hu: float, expected: Grade
) -> None:
    result = run(liver_hu)
    assert result.grade is expected and result.borderline
    assert result.borderline_margin_hu == 2.41
    assert result.graded_hu == result.parenchymal_hu
    assert result.grade_basis == "DL-parenchymal of the seed's three ROIs"


def test_values_outside_the_margin_and_ungraded_series_are_not_borderline() -> None:
    assert not run(45.0).borderline and not run(35.0).borderline
    series, liver = phantom_series(40.0)
    ineligible = measure_series(series, liver, eligible=False, reasons=(Finding(Reason.CONTRAST, "IV contrast"),))
    assert ineligible.grade is Grade.NOT_GRADED and not ineligible.borderline


def test_borderline_margin_comes_from_the_config() -> None:
    config = AnalysisConfig(grading=GradingConfig(borderline_margin_hu=6.0))
    assert run(45.0, config=config).borderline


def test_contrast_enhanced_liver_is_measured_but_not_graded() -> None:
    result = run(110.0)
    assert result.grade is Grade.NOT_GRADED
    assert [r.code for r in result.reasons] == [Reason.IMAGE_SUGGESTS_CONTRAST]
    assert result.parenchymal_hu == pytest.approx(110.0, abs=1.0)


def test_ineligible_series_is_measured_but_not_graded_and_says_why() -> None:
    series, liver = phantom_series(35.0)
    why = Finding(Reason.ABDOMINAL, "StudyDescription 'CT ABDOMEN' names an abdominal study")
    result = measure_series(series, liver, eligible=False, reasons=(why,))
    assert result.grade is Grade.NOT_GRADED and result.reasons == (why,)
    assert result.parenchymal_hu == pytest.approx(35.0, abs=1.0) and not result.eligible


def test_robust_mode_keeps_rois_that_already_fit() -> None:
    assert [r.centre_lps for r in run(config=AnalysisConfig(roi_mode=RoiMode.ROBUST)).rois] == [
        r.centre_lps for r in run().rois
    ]


def test_backend_mask_is_used_and_its_model_reported() -> None:
    series, _ = phantom_series()
    result = measure_series(series, AnalyticLiverBackend(), eligible=True, reasons=())
    assert result.model == AnalyticLiverBackend.info
    assert result.grade is Grade.NONE_OR_MILD
    # x and z: the row of the lateral-most column's tip is sub-voxel sensitive, see test_roi
    centres, user_mask_centres = (np.array([roi.centre_lps for roi in r.rois]) for r in (result, run()))
    assert np.allclose(centres[:, [0, 2]], user_mask_centres[:, [0, 2]], atol=1.4)


def test_backend_mask_on_another_grid_is_a_mask_mismatch() -> None:
    series, _ = phantom_series()
    with pytest.raises(LiverfatError, match="not on the working grid") as raised:
        measure_series(series, WrongGridBackend(), eligible=True, reasons=())
    assert raised.value.reason is Reason.MASK_MISMATCH


def test_user_mask_with_several_labels_is_a_mask_mismatch() -> None:
    series, liver = phantom_series()
    labels = liver.with_array(liver.array.astype(np.uint8) * 5)
    labels.array[0, 0, 0] = 2
    with pytest.raises(LiverfatError, match=r"labels \[2, 5\]") as raised:
        measure_series(series, labels, eligible=True, reasons=())
    assert raised.value.reason is Reason.MASK_MISMATCH


def test_user_mask_outside_the_ct_is_a_mask_mismatch() -> None:
    series, liver = phantom_series()
    elsewhere = Volume(liver.array, liver.spacing, (1000.0, 0.0, 0.0), liver.direction)
    with pytest.raises(LiverfatError, match="frame of reference") as raised:
        measure_series(series, elsewhere, eligible=True, reasons=())
    assert raised.value.reason is Reason.MASK_MISMATCH


def test_empty_user_mask_gives_no_liver_and_no_grade() -> None:
    series, liver = phantom_series()
    result = measure_series(series, liver.with_array(np.zeros_like(liver.array)), eligible=True, reasons=())
    assert result.grade is Grade.NOT_GRADED and [r.code for r in result.reasons] == [Reason.NO_LIVER]
    assert result.rois == () and result.parenchymal_hu is None


def test_analysis_config_from_mapping() -> None:
    config = AnalysisConfig.from_mapping({"roi_mode": "robust", "grading": {"threshold_hu": 42}})
    assert config.roi_mode is RoiMode.ROBUST and config.grading.threshold_hu == 42.0
    assert config.working_spacing_mm == (0.7, 0.7, 2.5)
    with pytest.raises(ValueError, match="unknown analysis setting"):
        AnalysisConfig.from_mapping({"roi": "seed"})
    with pytest.raises(ValueError, match="roi_mode"):
        AnalysisConfig.from_mapping({"roi_mode": "clever"})
    with pytest.raises(ValueError, match="working_spacing_mm"):
        AnalysisConfig.from_mapping({"working_spacing_mm": [0.7, 0.7]})


@pytest.mark.slow
def test_seed_case_rois_match_the_seed_through_the_pipeline(shared_data: Path) -> None:
    seed = shared_data / "seed-dl-parenchymal"
    liver = Volume.from_sitk(sitk.ReadImage(str(seed / "LIDC-IDRI_0002_3d_liver_seg.nii.gz")))
    liver = liver.with_array(liver.array > 0)
    ct = liver.with_array(np.full(liver.array.shape, 50, np.int16))  # the CT is not published
    series = CTSeries(volume=ct, series_uid="1.2.3", study_uid=None)
    result = measure_series(series, liver, eligible=True, reasons=())
    seed_rois = sitk.GetArrayFromImage(sitk.ReadImage(str(seed / "LIDC-IDRI_0002_AI_ROI_seg.nii.gz")))
    assert [roi.slice_index for roi in result.rois] == [17, 15, 13]
    for roi in result.rois:
        rows, columns = np.nonzero(seed_rois[roi.slice_index])
        seed_centre = liver.to_lps((columns.mean(), rows.mean(), roi.slice_index))
        assert roi.n_voxels == 401
        assert np.linalg.norm(np.subtract(roi.centre_lps, seed_centre)) < 5.0
    assert result.grade is Grade.NONE_OR_MILD and result.parenchymal_hu == pytest.approx(50.0)
    assert result.warnings == ()


@pytest.mark.slow
def test_portal_venous_ircadb_liver_is_recognised_as_contrast_enhanced(shared_data: Path) -> None:
    """3D-IRCADb-01 patient 1 (portal venous phase) with its manual liver mask."""

    def read(folder: Path) -> Volume:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        return Volume.from_sitk(reader.Execute())

    ircadb = shared_data / "3dircadb-1.1"
    ct, mask = read(ircadb / "PATIENT_DICOM"), read(ircadb / "MASKS_DICOM" / "liver")
    series = CTSeries(volume=ct, series_uid="1.2.3", study_uid=None)
    result = measure_series(series, mask.with_array(mask.array > 0), eligible=True, reasons=())
    assert result.grade is Grade.NOT_GRADED
    assert Reason.IMAGE_SUGGESTS_CONTRAST in [r.code for r in result.reasons]
    assert result.volumetric_hu is not None and result.volumetric_hu > 95.0
