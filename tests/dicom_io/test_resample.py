from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from scipy import ndimage

from liverfat.dicom_io.resample import (
    OUTSIDE_HU,
    WORKING_SPACING_MM,
    mask_to_grid,
    mask_to_source,
    nonzero_box,
    to_working_grid,
)
from liverfat.volume import Volume
from tests.phantom import Grid, Phantom, render_volume, storage_variants

# a liver-centred field: 128 x 1.4 mm covers the phantom liver (x -140..10, y -90..80 mm)
SOURCE = Grid(rows=128, columns=128, pixel_spacing_mm=1.4, centre=(-65.0, -5.0, 0.0),
              slice_positions_mm=tuple(np.arange(-65.0, 65.1, 2.5)))


@cache
def rendered(variant: str) -> tuple[Volume, Volume]:
    """(CT, liver) of the noise-free phantom on one storage variant of ``SOURCE``."""
    return render_volume(Phantom(noise_sd_hu=0.0), storage_variants(SOURCE)[variant])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_working_grid_is_canonical_lps_covering_the_source_voxel_centres() -> None:
    ct, _ = render_volume(Phantom(), SOURCE)
    working = to_working_grid(ct)
    assert working.array.dtype == np.float32
    assert np.array_equal(working.direction, np.eye(3))
    assert working.spacing == WORKING_SPACING_MM
    assert working.origin == pytest.approx(ct.origin)
    # 127 steps of 1.4 mm = 254 steps of 0.7 mm; 52 steps of 2.5 mm stay 52
    assert working.size == (255, 255, 53)
    # voxels at the same position read the same HU (linear interpolation hits them exactly)
    assert np.allclose(working.array[:, ::2, ::2], ct.array, atol=1e-3)


def test_working_grid_reads_air_outside_an_oblique_source() -> None:
    angle = np.deg2rad(30.0)
    oblique = Grid(rows=32, columns=32, pixel_spacing_mm=4.0, slice_positions_mm=(-5.0, 0.0, 5.0),
                   row_direction=(np.cos(angle), np.sin(angle), 0.0),
                   column_direction=(-np.sin(angle), np.cos(angle), 0.0))
    ct, _ = render_volume(Phantom(noise_sd_hu=0.0), oblique)
    working = to_working_grid(ct, spacing=(2.0, 2.0, 5.0))
    assert working.array[0, 0, 0] == OUTSIDE_HU  # the bounding box corner lies outside the rotated slab
    centre = tuple(int(n) // 2 for n in working.array.shape)  # near (0, 0, 0), inside the liver
    assert working.array[centre] == pytest.approx(Phantom().liver.hu, abs=1e-3)


def test_mask_round_trip_through_the_working_grid_keeps_geometry_and_shape() -> None:
    # 0.9 mm pixels and 1.25 mm slices: neither is a multiple of the working spacing
    thin = Grid(rows=200, columns=200, pixel_spacing_mm=0.9, centre=(-65.0, -5.0, 0.3),
                slice_positions_mm=tuple(np.arange(-65.0, 65.1, 1.25)))
    ct, liver = render_volume(Phantom(), thin)
    working = mask_to_grid(liver, to_working_grid(ct))
    back = mask_to_source(working, ct)
    assert back.array.dtype == bool
    assert back.same_grid(ct)
    assert dice(back.array, liver.array) > 0.98


@pytest.mark.parametrize("variant", ["feet-first", "rows-flipped", "columns-flipped", "transposed"])
def test_storage_order_does_not_change_the_working_grid(variant: str) -> None:
    reference_ct, reference_liver = rendered("head-first")
    ct, liver = rendered(variant)
    reference, working = to_working_grid(reference_ct), to_working_grid(ct)
    assert working.same_grid(reference)
    assert np.allclose(working.array, reference.array, atol=1e-3)
    assert np.array_equal(mask_to_grid(liver, working).array, mask_to_grid(reference_liver, reference).array)


@pytest.mark.parametrize("variant", ["feet-first", "rows-flipped", "columns-flipped", "transposed"])
def test_mask_to_source_lands_on_the_anatomy_of_a_reordered_source(variant: str) -> None:
    head_first_ct, head_first_liver = rendered("head-first")
    working = mask_to_grid(head_first_liver, to_working_grid(head_first_ct))
    _, liver = rendered(variant)
    assert dice(mask_to_source(working, liver).array, liver.array) > 0.98


def test_label_map_keeps_each_label_on_its_own_slice() -> None:
    working = Volume(np.zeros((9, 60, 60), dtype=np.uint8), WORKING_SPACING_MM, (0.0, 0.0, 0.0))
    for label, k in ((1, 6), (2, 4), (3, 2)):
        working.array[k, 20:43, 20:43] = label  # 23 x 23 px
    source = Volume(np.zeros((9, 30, 30), dtype=np.int16), (1.4, 1.4, 2.5), (0.0, 0.0, 0.0))
    mapped = mask_to_source(working, source)
    assert mapped.array.dtype == np.uint8
    for label, k in ((1, 6), (2, 4), (3, 2)):
        on_slices = np.flatnonzero((mapped.array == label).any(axis=(1, 2)))
        assert on_slices.tolist() == [k]
        assert (mapped.array == label).sum() == pytest.approx(23 * 23 / 4, rel=0.15)


def test_a_slab_halfway_between_source_slices_lands_on_both() -> None:
    working = Volume(np.zeros((5, 20, 20), dtype=np.uint8), WORKING_SPACING_MM, (0.0, 0.0, 0.0))
    working.array[2, 5:15, 5:15] = 1  # z = 5 mm
    source = Volume(np.zeros((4, 20, 20), dtype=np.int16), WORKING_SPACING_MM, (0.0, 0.0, 1.25))  # z 1.25, 3.75, ...
    mapped = mask_to_source(working, source)
    assert np.flatnonzero(mapped.array.any(axis=(1, 2))).tolist() == [1, 2]


def test_a_mask_outside_the_reference_maps_to_nothing() -> None:
    mask = Volume(np.ones((3, 4, 4), dtype=bool), (1.0, 1.0, 1.0), (500.0, 0.0, 0.0))
    reference = Volume(np.zeros((3, 4, 4), dtype=np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    assert not mask_to_grid(mask, reference).array.any()


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int16])
def test_nonzero_box_is_find_objects_box_of_all_nonzero_voxels(dtype: type) -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        array = np.zeros((9, 13, 11), dtype=dtype)
        corner = rng.integers(0, (9, 13, 11))
        size = rng.integers(1, 5, 3)
        blob = rng.integers(0, 3, tuple(int(n) for n in np.minimum(size, (9, 13, 11) - corner)))
        array[tuple(slice(c, c + n) for c, n in zip(corner, blob.shape, strict=True))] = blob.astype(dtype)
        expected = ndimage.find_objects((array != 0).astype(np.uint8))
        assert nonzero_box(array) == (expected[0] if expected else None)


def test_label_boxes_of_labels_far_from_the_origin_keep_their_place() -> None:
    """Labels are looked for within the box of all labels; their boxes are still on the whole grid."""
    working = Volume(np.zeros((40, 80, 80), dtype=np.uint8), WORKING_SPACING_MM, (0.0, 0.0, 0.0))
    working.array[30, 50:60, 60:70] = 2
    working.array[33, 55:65, 62:72] = 1
    mapped = mask_to_grid(working, working)
    assert np.array_equal(mapped.array, working.array)


@pytest.mark.parametrize("label", [1, 3])
def test_a_single_label_maps_as_the_bool_mask_of_its_voxels_does(label: int) -> None:
    """One label takes the short path (weight >= 0.5); it must give the bool mask's voxels, labelled."""
    rng = np.random.default_rng(3)
    working = Volume(np.zeros((12, 40, 40), dtype=np.uint8), WORKING_SPACING_MM, (0.0, 0.0, 0.0))
    working.array[3:9, 8:30, 10:33] = (rng.random((6, 22, 23)) > 0.3) * label
    source = Volume(np.zeros((25, 23, 23), dtype=np.int16), (1.3, 1.3, 1.25), (0.4, -0.6, 0.3))
    as_bool = mask_to_source(working.with_array(working.array != 0), source).array
    assert as_bool.dtype == np.bool_ and as_bool.any()
    with_second_label = working.array.copy()
    with_second_label[0, 0, 0] = label + 1  # a second label far away: the general path
    general = mask_to_source(working.with_array(with_second_label), source).array
    single = mask_to_source(working, source).array
    assert np.array_equal(single, as_bool * label)
    assert np.array_equal(np.where(general == label, label, 0), single)
