from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from liverfat.errors import Reason
from liverfat.inference.roi import (
    MEDIAL_OFFSET_MM,
    ROBUST_MARGIN_MM,
    ROBUST_MAX_SHIFT_MM,
    RoiMode,
    ellipse_kernel,
    place_rois,
)
from liverfat.volume import Volume
from tests.phantom import Grid, Phantom, render_volume, storage_variants

SEED = Path("seed-dl-parenchymal")
LIVER = Phantom().liver
# the phantom liver rendered straight onto a working-resolution grid (0.7 x 0.7 x 2.5 mm),
# a slab around its largest cross-section (z = 0)
WORKING = Grid(rows=256, columns=256, pixel_spacing_mm=0.7, centre=LIVER.centre,
               slice_positions_mm=tuple(np.arange(-12.5, 12.6, 2.5)))


@cache
def phantom_liver(variant: str = "head-first") -> Volume:
    return render_volume(Phantom(noise_sd_hu=0.0), storage_variants(WORKING)[variant])[1]


def box_mask(shape: tuple[int, int, int], rows: slice, columns: slice, slices: list[int]) -> Volume:
    """A rectangular liver on an LPS-identity 0.7 x 0.7 x 2.5 mm grid."""
    array = np.zeros(shape, dtype=bool)
    for k in slices:
        array[k, rows, columns] = True
    return Volume(array, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0))


def test_ellipse_kernel_is_cv2_morph_ellipse_with_401_pixels() -> None:
    kernel = ellipse_kernel(23, 23)
    assert kernel.shape == (23, 23) and kernel.dtype == np.uint8
    assert kernel.sum() == 401
    assert np.array_equal(kernel, kernel[::-1]) and np.array_equal(kernel, kernel[:, ::-1])
    assert kernel[0].sum() == 1 and kernel[:, 0].sum() == 7  # not transpose-symmetric, as in OpenCV
    # cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)): a plus-shaped 21-pixel disc
    plus = [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert ellipse_kernel(5, 5).tolist() == plus


def test_ellipse_kernel_is_the_seed_roi_shape(shared_data: Path) -> None:
    seed_rois = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / SEED / "LIDC-IDRI_0002_AI_ROI_seg.nii.gz")))
    for k in (13, 15, 17):
        rows, columns = np.nonzero(seed_rois[k])
        footprint = seed_rois[k, rows.min() : rows.max() + 1, columns.min() : columns.max() + 1] > 0
        assert np.array_equal(footprint, ellipse_kernel(23, 23).astype(bool))


def test_roi_lies_21_mm_medial_of_the_analytic_lateral_liver_edge() -> None:
    liver = phantom_liver()
    placement = place_rois(liver)
    assert not placement.warnings
    z_of = {k: liver.to_lps((0, 0, k))[2] for k in range(liver.array.shape[0])}
    assert z_of[placement.largest_slice] == pytest.approx(LIVER.centre[2])
    assert [roi.label for roi in placement.rois] == [1, 2, 3]
    assert [roi.slice_index - placement.largest_slice for roi in placement.rois] == [2, 0, -2]  # cranial first
    (cx, cy, cz), (a, b, c) = LIVER.centre, LIVER.semi_axes
    for roi in placement.rois:
        assert (placement.labels.array == roi.label).sum() == 401
        assert np.flatnonzero((placement.labels.array == roi.label).any(axis=(1, 2))).tolist() == [roi.slice_index]
        x, y, z = roi.centre_lps
        assert z == pytest.approx(z_of[roi.slice_index])
        scale = np.sqrt(1.0 - ((z - cz) / c) ** 2)
        lateral_edge = cx - a * scale
        column_x = x - MEDIAL_OFFSET_MM  # the lateral-most liver column: the first voxel column inside the edge
        assert 0.0 <= column_x - lateral_edge < 0.7 + 1e-6
        # the first (most anterior) row of that column: the first voxel row inside the ellipse's chord
        anterior_end = cy - b * scale * np.sqrt(1.0 - ((column_x - cx) / (a * scale)) ** 2)
        assert 0.0 <= y - anterior_end < 0.7 + 1e-6
        assert roi.radius_mm == pytest.approx(8.05)


@pytest.mark.parametrize("variant", ["feet-first", "rows-flipped", "columns-flipped", "transposed"])
def test_same_anatomical_roi_whatever_the_storage_order(variant: str) -> None:
    reference = place_rois(phantom_liver())
    placement = place_rois(phantom_liver(variant))
    assert [roi.label for roi in placement.rois] == [1, 2, 3]
    for roi, expected in zip(placement.rois, reference.rois, strict=True):
        assert roi.centre_lps == pytest.approx(expected.centre_lps, abs=1e-6)
        voxels = np.argwhere(placement.labels.array == roi.label)[:, ::-1]
        expected_voxels = np.argwhere(reference.labels.array == roi.label)[:, ::-1]
        assert placement.labels.to_lps(voxels).mean(axis=0) == pytest.approx(
            reference.labels.to_lps(expected_voxels).mean(axis=0), abs=1e-6
        )


def test_largest_slice_at_the_bottom_uses_the_seed_slices_0_2_4_and_warns() -> None:
    liver = box_mask((12, 80, 80), slice(10, 70), slice(5, 75), slices=list(range(0, 8)))
    liver.array[1, 5:75, 5:75] = True  # the largest slice: k = 1 (< 2)
    placement = place_rois(liver)
    assert placement.largest_slice == 1
    assert [roi.slice_index for roi in placement.rois] == [4, 2, 0]
    assert [w.code for w in placement.warnings] == [Reason.LIVER_AT_EDGE]


def test_largest_slice_at_the_top_shifts_the_slices_inward_where_the_seed_would_crash() -> None:
    liver = box_mask((12, 80, 80), slice(10, 70), slice(5, 75), slices=list(range(4, 12)))
    liver.array[11, 5:75, 5:75] = True
    placement = place_rois(liver)
    assert placement.largest_slice == 11
    assert [roi.slice_index for roi in placement.rois] == [11, 9, 7]
    assert [w.code for w in placement.warnings] == [Reason.LIVER_AT_EDGE]


def test_roi_slice_without_liver_gets_no_roi_and_a_reason() -> None:
    liver = box_mask((12, 80, 80), slice(10, 70), slice(5, 75), slices=[0, 1])
    liver.array[1, 5:75, 5:75] = True
    placement = place_rois(liver)
    assert [roi.slice_index for roi in placement.rois] == [0]
    assert [w.code for w in placement.warnings] == [Reason.LIVER_AT_EDGE, Reason.ROI_NOT_PLACED, Reason.ROI_NOT_PLACED]
    assert set(np.unique(placement.labels.array)) == {0, 3}


def test_too_few_slices_for_three_rois_places_none() -> None:
    placement = place_rois(box_mask((4, 80, 80), slice(10, 70), slice(5, 75), slices=[0, 1, 2, 3]))
    assert placement.rois == ()
    assert [w.code for w in placement.warnings] == [Reason.ROI_NOT_PLACED]


def test_empty_mask_places_no_roi() -> None:
    placement = place_rois(box_mask((8, 40, 40), slice(0, 0), slice(0, 0), slices=[]))
    assert placement.rois == () and placement.largest_slice is None
    assert not placement.labels.array.any()


def test_seed_mode_does_not_clip_the_circle_to_the_liver() -> None:
    # the lateral-most column's first row is the box's top-left corner: the circle sticks out above
    liver = box_mask((7, 120, 160), slice(40, 100), slice(20, 120), slices=list(range(7)))
    placement = place_rois(liver, RoiMode.SEED)
    for roi in placement.rois:
        voxels = placement.labels.array == roi.label
        assert voxels.sum() == 401
        assert roi.centre_index[:2] == (50, 40)  # column 20 + 30, row 40
        assert liver.array[voxels].mean() < 0.7


def test_robust_mode_moves_the_circle_inside_the_eroded_liver_on_the_same_slices() -> None:
    liver = box_mask((7, 120, 160), slice(40, 100), slice(20, 120), slices=list(range(7)))
    seed, robust = place_rois(liver, RoiMode.SEED), place_rois(liver, RoiMode.ROBUST)
    margin = round(ROBUST_MARGIN_MM / 0.7)
    for seed_roi, roi in zip(seed.rois, robust.rois, strict=True):
        assert roi.slice_index == seed_roi.slice_index
        voxels = robust.labels.array == roi.label
        assert voxels.sum() == 401 and liver.array[voxels].all()
        rows = np.flatnonzero(voxels.any(axis=(0, 2)))
        assert rows.min() >= 40 + margin
        shift = np.linalg.norm(np.subtract(roi.centre_lps, seed_roi.centre_lps))
        assert 0 < shift <= ROBUST_MAX_SHIFT_MM


def test_robust_mode_keeps_a_circle_that_already_fits() -> None:
    liver = phantom_liver()
    seed, robust = place_rois(liver, RoiMode.SEED), place_rois(liver, RoiMode.ROBUST)
    assert [r.centre_index for r in robust.rois] == [r.centre_index for r in seed.rois]


def test_oblique_grid_is_rejected() -> None:
    angle = np.deg2rad(20.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    liver = Volume(np.ones((5, 10, 10), dtype=bool), (0.7, 0.7, 2.5), (0.0, 0.0, 0.0), direction)
    with pytest.raises(ValueError, match="axis-aligned"):
        place_rois(liver)


def test_seed_case_rois_land_where_the_seed_put_them(shared_data: Path) -> None:
    """LIDC-IDRI 0002: the seed placed its ROIs from its own (unpublished) nnU-Net mask; from
    the published manual mask the same slices come out and the centres lie within 5 mm."""
    image = sitk.ReadImage(str(shared_data / SEED / "LIDC-IDRI_0002_3d_liver_seg.nii.gz"))
    liver = Volume.from_sitk(image)
    liver = liver.with_array(liver.array > 0)
    seed_rois = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / SEED / "LIDC-IDRI_0002_AI_ROI_seg.nii.gz")))
    placement = place_rois(liver)
    assert not placement.warnings
    assert sorted(roi.slice_index for roi in placement.rois) == [13, 15, 17]
    for roi in placement.rois:
        assert (placement.labels.array == roi.label).sum() == 401
        rows, columns = np.nonzero(seed_rois[roi.slice_index])
        seed_centre = liver.to_lps((columns.mean(), rows.mean(), roi.slice_index))
        assert np.linalg.norm(np.subtract(roi.centre_lps, seed_centre)) < 5.0
