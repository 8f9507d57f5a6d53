from __future__ import annotations

import numpy as np
import pytest

from liverfat.dicom_io.errors import Reason
from liverfat.dicom_io.volume import Volume
from liverfat.inference.attenuation import measure
from liverfat.inference.grading import GradingConfig
from liverfat.inference.roi import place_rois

SPACING = (0.7, 0.7, 2.5)
LIMITS = GradingConfig().limits
FAT_HU = -100.0


def elliptic_liver(n_slices: int = 7, largest: int = 3) -> Volume:
    """An elliptical liver cross-section per slice, largest on slice ``largest``."""
    rows, columns = np.mgrid[0:120, 0:160]
    array = np.zeros((n_slices, 120, 160), dtype=bool)
    for k in range(n_slices):
        scale = 1.0 - 0.02 * abs(k - largest)
        array[k] = ((rows - 60) / (45 * scale)) ** 2 + ((columns - 80) / (70 * scale)) ** 2 <= 1.0
    return Volume(array, SPACING, (0.0, 0.0, 0.0))


def ct_for(liver: Volume, liver_hu: np.ndarray | float, noise_sd_hu: float = 0.0) -> Volume:
    """Fat around a liver of ``liver_hu`` (a number or one value per slice)."""
    per_slice = np.broadcast_to(np.asarray(liver_hu, dtype=np.float32), (liver.array.shape[0],))
    hu = np.where(liver.array, per_slice[:, None, None], np.float32(FAT_HU)).astype(np.float32)
    hu += np.random.default_rng(1).normal(0.0, noise_sd_hu, hu.shape).astype(np.float32)
    return liver.with_array(hu)


def test_figures_are_pooled_roi_mean_whole_liver_mean_and_largest_slice_mean() -> None:
    liver = elliptic_liver()
    slice_hu = 50.0 + np.arange(7)  # slice k reads 50 + k HU
    placement = place_rois(liver)
    result = measure(ct_for(liver, slice_hu), liver, placement, LIMITS)
    assert [roi.slice_index for roi in result.rois] == [5, 3, 1]
    assert [roi.mean_hu for roi in result.rois] == pytest.approx([55.0, 53.0, 51.0])
    assert result.parenchymal_hu == pytest.approx(53.0)
    counts = liver.array.sum(axis=(1, 2))
    assert result.volumetric_hu == pytest.approx(float((counts * slice_hu).sum() / counts.sum()))
    assert result.axial_hu == pytest.approx(53.0)
    assert result.liver_volume_ml == pytest.approx(counts.sum() * 0.7 * 0.7 * 2.5 / 1000.0)
    assert not result.warnings


def test_roi_measurement_reports_size_position_and_spread() -> None:
    liver = elliptic_liver()
    placement = place_rois(liver)
    result = measure(ct_for(liver, 55.0, noise_sd_hu=10.0), liver, placement, LIMITS)
    for roi, geometry in zip(result.rois, placement.rois, strict=True):
        assert roi.n_voxels == 401
        assert roi.area_mm2 == pytest.approx(401 * 0.49)
        assert roi.inside_liver_fraction == 1.0
        assert roi.sd_hu == pytest.approx(10.0, abs=1.5)
        assert roi.centre_lps == geometry.centre_lps and roi.z_mm == geometry.centre_lps[2]
        assert roi.radius_mm == pytest.approx(8.05)


def test_noisy_homogeneous_liver_raises_no_warning() -> None:
    liver = elliptic_liver()
    result = measure(ct_for(liver, 55.0, noise_sd_hu=20.0), liver, place_rois(liver), LIMITS)
    assert result.warnings == ()


def test_roi_sticking_out_of_the_liver_is_flagged() -> None:
    liver = Volume(np.zeros((7, 120, 160), dtype=bool), SPACING, (0.0, 0.0, 0.0))
    liver.array[:, 40:100, 20:120] = True  # the seed's circle overhangs the box's anterior edge
    result = measure(ct_for(liver, 55.0), liver, place_rois(liver), LIMITS)
    outside = [w for w in result.warnings if w.code is Reason.ROI_OUTSIDE_LIVER]
    assert len(outside) == 3
    assert all(roi.inside_liver_fraction < LIMITS.min_inside_liver_fraction for roi in result.rois)


def test_enhanced_vessel_through_one_roi_is_flagged_for_that_roi_only() -> None:
    liver = elliptic_liver()
    placement = place_rois(liver)
    ct = ct_for(liver, 55.0, noise_sd_hu=10.0)
    middle = placement.rois[1]
    i, j, k = middle.centre_index
    ct.array[k, j - 2 : j + 3, :] = 180.0  # a 3.5 mm enhanced vessel crossing the middle ROI
    result = measure(ct, liver, placement, LIMITS)
    flagged = [w for w in result.warnings if w.code is Reason.ROI_ON_VESSEL]
    assert flagged and all(w.message.startswith(f"ROI 2 (slice {k})") for w in flagged)


def test_hypodense_vessel_that_shifts_the_roi_mean_is_flagged() -> None:
    liver = elliptic_liver()
    placement = place_rois(liver)
    ct = ct_for(liver, 60.0, noise_sd_hu=10.0)
    i, j, k = placement.rois[0].centre_index
    ct.array[k, j - 4 : j + 5, :] = 30.0  # unenhanced blood, 30 HU below the liver, 40 % of the circle
    result = measure(ct, liver, placement, LIMITS)
    assert [w.code for w in result.warnings] == [Reason.ROI_ON_VESSEL]
    assert "differs from the whole-liver mean" in result.warnings[0].message


def test_placement_warnings_are_carried_into_the_measurement() -> None:
    liver = elliptic_liver(largest=0)
    result = measure(ct_for(liver, 55.0), liver, place_rois(liver), LIMITS)
    assert [w.code for w in result.warnings] == [Reason.LIVER_AT_EDGE]


def test_empty_liver_mask_reports_no_liver_and_no_figures() -> None:
    liver = Volume(np.zeros((7, 40, 40), dtype=bool), SPACING, (0.0, 0.0, 0.0))
    result = measure(ct_for(liver, 55.0), liver, place_rois(liver), LIMITS)
    assert [w.code for w in result.warnings] == [Reason.NO_LIVER]
    assert result.parenchymal_hu is None and result.volumetric_hu is None and result.axial_hu is None
    assert result.liver_volume_ml == 0.0 and result.rois == ()


def test_ct_and_mask_on_different_grids_are_rejected() -> None:
    liver = elliptic_liver()
    shifted = Volume(ct_for(liver, 55.0).array, SPACING, (1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="share one grid"):
        measure(shifted, liver, place_rois(liver), LIMITS)
