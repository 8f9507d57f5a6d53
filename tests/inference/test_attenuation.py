from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from liverfat.errors import Reason
from liverfat.inference.attenuation import measure, parenchymal_reference
from liverfat.inference.grading import GradingConfig
from liverfat.inference.roi import place_rois
from liverfat.result import RoiRule
from liverfat.volume import Volume

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


def test_roi_sticking_out_of_the_liver_is_replaced_by_a_shifted_circle_inside_it() -> None:
    liver = Volume(np.zeros((7, 120, 160), dtype=bool), SPACING, (0.0, 0.0, 0.0))
    liver.array[:, 40:100, 20:120] = True  # the seed's circle overhangs the box's anterior edge
    ct = ct_for(liver, 55.0)
    ct.array[~liver.array] = FAT_HU
    placement = place_rois(liver)
    result = measure(ct, liver, placement, LIMITS)
    replaced = [w for w in result.warnings if w.code is not Reason.LIVER_AT_EDGE]  # equal slices: largest is first
    assert [w.code for w in replaced] == [Reason.ROI_REPLACED] * 3
    assert all("lie in the liver mask" in w.message and "shifted circle" in w.message for w in replaced)
    assert [roi.rule for roi in result.rois] == [RoiRule.SHIFTED] * 3
    assert [roi.slice_index for roi in result.rois] == [roi.slice_index for roi in placement.rois]
    assert all(roi.inside_liver_fraction >= LIMITS.min_inside_liver_fraction for roi in result.rois)
    assert result.graded_hu == pytest.approx(55.0, abs=2.0)  # up to 5 % of a circle may lie in fat
    assert result.parenchymal_hu is not None and result.parenchymal_hu < 50.0  # the seed's circles, fat included
    for roi in result.rois:  # the label map holds the replacements, not the seed's circles
        assert np.count_nonzero(result.labels.array == roi.label) == roi.n_voxels
        assert liver.array[result.labels.array == roi.label].mean() >= LIMITS.min_inside_liver_fraction


def test_roi_that_fits_nowhere_in_the_liver_keeps_its_failure() -> None:
    liver = Volume(np.zeros((7, 120, 160), dtype=bool), SPACING, (0.0, 0.0, 0.0))
    liver.array[:, 50:62, 20:120] = True  # an 8 mm strip: no 16 mm circle fits anywhere
    result = measure(ct_for(liver, 55.0), liver, place_rois(liver), LIMITS)
    codes = [w.code for w in result.warnings]
    assert codes.count(Reason.ROI_OUTSIDE_LIVER) == 3 and Reason.ROI_REPLACED not in codes
    assert all(roi.rule is RoiRule.SEED for roi in result.rois)
    assert result.graded_hu == result.parenchymal_hu


def test_enhanced_vessel_through_one_roi_replaces_that_roi_by_the_seed_rule_on_the_next_slice() -> None:
    liver = elliptic_liver()
    placement = place_rois(liver)
    ct = ct_for(liver, 55.0, noise_sd_hu=10.0)
    middle = placement.rois[1]
    i, j, k = middle.centre_index
    ct.array[k, j - 2 : j + 3, :] = 180.0  # a 3.5 mm enhanced vessel crossing the middle ROI's whole slice
    placed = placement.labels.array.copy()
    result = measure(ct, liver, placement, LIMITS)
    assert np.array_equal(placement.labels.array, placed)  # the replacement is in the result's map only
    assert np.count_nonzero(result.labels.array == 2) == result.rois[1].n_voxels
    assert [w.code for w in result.warnings] == [Reason.ROI_REPLACED]
    assert result.warnings[0].message.startswith(f"ROI 2 (slice {k})")
    assert [roi.rule for roi in result.rois] == [RoiRule.SEED, RoiRule.NEXT_SLICE, RoiRule.SEED]
    assert result.rois[1].slice_index == k - 1  # caudal first on equal distance; k + 1 is free too
    assert result.graded_hu == pytest.approx(55.0, abs=1.5)
    assert result.parenchymal_hu is not None and result.parenchymal_hu > result.graded_hu + 5.0


def test_vessel_on_every_candidate_keeps_the_failure_and_the_seed_rois() -> None:
    liver = elliptic_liver()
    placement = place_rois(liver)
    ct = ct_for(liver, 55.0, noise_sd_hu=10.0)
    band = np.zeros(liver.array.shape, dtype=bool)
    band[:, 34:87, :86] = True  # every slice, around every seed circle and every shift of it
    ct.array[band & liver.array] = 180.0
    result = measure(ct, liver, placement, LIMITS)
    assert {w.code for w in result.warnings} == {Reason.ROI_ON_VESSEL}
    assert all(roi.rule is RoiRule.SEED for roi in result.rois)


def test_hypodense_vessel_that_shifts_the_roi_mean_is_replaced() -> None:
    liver = elliptic_liver()
    placement = place_rois(liver)
    ct = ct_for(liver, 60.0, noise_sd_hu=10.0)
    i, j, k = placement.rois[0].centre_index
    ct.array[k, j - 4 : j + 5, :] = 30.0  # unenhanced blood, 30 HU below the liver, 40 % of the circle
    result = measure(ct, liver, placement, LIMITS)
    assert [w.code for w in result.warnings] == [Reason.ROI_REPLACED]
    assert "differs from the liver's parenchymal median" in result.warnings[0].message
    assert result.graded_hu == pytest.approx(60.0, abs=1.5)


def test_rois_are_judged_against_the_parenchyma_not_a_rim_lowered_whole_liver_mean() -> None:
    liver = elliptic_liver()
    ct = ct_for(liver, 62.0, noise_sd_hu=15.0)
    rim = liver.array & ~ndimage.binary_erosion(liver.array, iterations=6, structure=np.ones((1, 3, 3)))
    ct.array[rim] = 20.0  # partial volume with fat along the capsule: whole-liver mean far below 62 HU
    result = measure(ct, liver, place_rois(liver), LIMITS)
    assert result.volumetric_hu is not None and result.volumetric_hu < 62.0 - LIMITS.max_roi_deviation_hu
    assert result.reference_hu == pytest.approx(62.0, abs=1.0)
    assert result.warnings == ()


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


def test_vessel_that_widens_the_roi_spread_without_moving_its_mean_is_replaced() -> None:
    liver = elliptic_liver()
    placement = place_rois(liver)
    ct = ct_for(liver, 60.0, noise_sd_hu=8.0)
    i, j, k = placement.rois[2].centre_index
    ct.array[k, j - 6 : j, :] += 45.0  # dense half and hypodense half: mean kept, spread tripled
    ct.array[k, j : j + 6, :] -= 45.0
    result = measure(ct, liver, placement, LIMITS)
    assert [w.code for w in result.warnings] == [Reason.ROI_REPLACED]
    assert "times the liver parenchyma's spread" in result.warnings[0].message
    assert result.rois[2].rule is RoiRule.NEXT_SLICE


def test_two_replaced_rois_never_share_a_slice() -> None:
    liver = elliptic_liver()
    placement = place_rois(liver)
    ct = ct_for(liver, 60.0, noise_sd_hu=8.0)
    (_, j1, k1), (_, j2, k2) = placement.rois[0].centre_index, placement.rois[1].centre_index
    for k, j in ((k1, j1), (k2, j2), (k2 - 1, j2)):  # dense vessels across ROI 1's, ROI 2's and the next caudal slice
        ct.array[k, j - 3 : j + 4, :] = 180.0
    result = measure(ct, liver, placement, LIMITS)
    # ROI 1 moves to k1 - 1 = k2 + 1, the one clean slice ROI 2 could also take: ROI 2 shifts on its own slice
    assert [roi.slice_index for roi in result.rois] == [k1 - 1, k2, placement.rois[2].slice_index]
    assert [roi.rule for roi in result.rois] == [RoiRule.NEXT_SLICE, RoiRule.SHIFTED, RoiRule.SEED]
    for roi in result.rois:  # each ROI's label map holds exactly the voxels it was measured on
        assert np.count_nonzero(result.labels.array == roi.label) == roi.n_voxels


def test_parenchymal_reference_on_the_liver_box_is_the_reference_on_the_whole_grid() -> None:
    """``measure`` passes the mask's bounding box: outside the arrays reads as background, as on the grid."""
    liver = elliptic_liver(n_slices=11, largest=5)
    grid = np.zeros((15, 140, 180), dtype=bool)
    grid[2:13, 10:130, 10:170] = liver.array
    hu = np.random.default_rng(3).normal(55.0, 12.0, grid.shape).astype(np.float32)
    (box,) = ndimage.find_objects(grid.view(np.uint8))
    whole = parenchymal_reference(hu, grid, SPACING)
    assert parenchymal_reference(hu[box], grid[box], SPACING) == whole
    assert whole.median_hu == pytest.approx(55.0, abs=1.0)


def test_parenchymal_reference_erodes_the_voxels_scipys_distance_transform_puts_beyond_5_mm() -> None:
    """The float32 ``edt`` distance gives the eroded set of scipy's float64 transform on the working grid."""
    rng = np.random.default_rng(7)
    mask = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((30, 120, 140)), 4.0) > 0.5, iterations=2)
    hu = rng.normal(50.0, 15.0, mask.shape).astype(np.float32)
    spacing = (0.7, 0.7, 2.5)  # (i, j, k), as the working grid
    distance = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=(2.5, 0.7, 0.7))[1:-1, 1:-1, 1:-1]
    inner = distance > 5.0
    assert 1000 <= np.count_nonzero(inner) < np.count_nonzero(mask)  # eroded, and enough left to be used
    median = float(np.median(hu[inner]))
    spread = 1.4826 * float(np.median(np.abs(hu[inner] - median)))
    reference = parenchymal_reference(hu, mask, spacing)
    assert (reference.median_hu, reference.spread_hu) == (median, spread)
