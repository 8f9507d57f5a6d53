"""The default backend: geometry (orientation, crop, 3 mm grid, tiles), clean-up, and real segmentations.

The model-backed tests run the real pretrained network on CPU (about 10 s per call on two free
cores; five calls in all).
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from liverfat.dicom_io.masks import read_mask_file
from liverfat.dicom_io.nifti import read_nifti
from liverfat.dicom_io.read import discover, load_series, read_mask
from liverfat.dicom_io.resample import to_working_grid
from liverfat.errors import LiverfatError, Reason
from liverfat.inference.backend import Backend
from liverfat.inference.models.default import (
    MODEL_NAME,
    TILE_OVERLAP,
    DefaultBackend,
    Tile,
    _CropGrid,
    _Orientation,
    body_box,
    liver_centred_box,
    postprocess,
    tiles,
    to_network_grid,
)
from liverfat.inference.models.unet import CONTEXT, TRAINED_OUTPUT
from liverfat.inference.models.weights import WEIGHTS_FILENAME, WEIGHTS_SHA256
from liverfat.volume import Volume
from tests.phantom import Grid, Phantom, render_volume

TOTALSEGMENTATOR_LIVER_LABEL = 5

# A phantom the pretrained network recognises: fat-like body (-90 HU) around the liver
# (55 HU, patient's right) and spleen; with the default water-like body it finds less.
FAT_BODY_PHANTOM = replace(Phantom(), body=replace(Phantom().body, hu=-90.0))


def _phantom_grid() -> Grid:
    return Grid(rows=200, columns=240, pixel_spacing_mm=1.4, slice_positions_mm=tuple(np.arange(-100.0, 100.1, 2.5)))


def _stored_with_flipped_rows_and_columns(volume: Volume) -> Volume:
    """The same voxels at the same LPS positions, stored right-to-left and back-to-front."""
    ni, nj, _ = volume.size
    origin = volume.to_lps([ni - 1, nj - 1, 0])
    direction = volume.direction @ np.diag([-1.0, -1.0, 1.0])
    return Volume(volume.array[:, ::-1, ::-1].copy(), volume.spacing, tuple(origin), direction)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _volume(shape: tuple[int, int, int], direction: np.ndarray, spacing: tuple[float, float, float]) -> Volume:
    return Volume(np.zeros(shape, dtype=np.float32), spacing, (0.0, 0.0, 0.0), direction)


# --------------------------------------------------------------------------------------------
# orientation


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.diag([1.0, 1.0, -1.0]), np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])],
    ids=["identity", "flipped-rows-columns", "feet-first", "permuted"],
)
def test_network_axes_run_to_the_patients_right_anterior_and_superior(direction: np.ndarray) -> None:
    volume = _volume((5, 6, 7), direction, (0.7, 0.8, 2.5))
    # the voxel furthest to the patient's right, front and head: smallest L, smallest P, largest S
    corners = np.array([[i, j, k] for i in (0, 6) for j in (0, 5) for k in (0, 4)], dtype=float)
    lps = volume.to_lps(corners)
    i, j, k = corners[np.argmax(-lps[:, 0] - lps[:, 1] + lps[:, 2])].astype(int)
    array = volume.array.copy()
    array[k, j, i] = 1.0

    orientation = _Orientation.of(volume)
    network = orientation.to_network(array)

    assert np.unravel_index(np.argmax(network), network.shape) == tuple(n - 1 for n in network.shape)
    assert np.array_equal(orientation.from_network(np.ascontiguousarray(network)), array)


def test_oblique_volumes_are_refused() -> None:
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    with pytest.raises(LiverfatError, match="oblique") as raised:
        _Orientation.of(_volume((3, 3, 3), rotation, (1.0, 1.0, 1.0)))
    assert raised.value.reason is Reason.NOT_AXIAL


# --------------------------------------------------------------------------------------------
# crop, 3 mm grid, window


def test_body_box_covers_the_body_and_leaves_out_a_separate_table() -> None:
    ct, _ = render_volume(FAT_BODY_PHANTOM, _phantom_grid())
    hu = ct.array.copy()
    hu[:, 190:196, 20:220] = 300.0  # a table under the body (rows run posterior), 8 mm of air between
    spacing = (ct.spacing[2], ct.spacing[1], ct.spacing[0])

    box = body_box(hu, spacing)

    assert box is not None
    rows, columns = box[1], box[2]
    # body: 230 mm front to back, 320 mm across, centred; rows/columns are 1.4 mm
    assert abs((rows.stop - rows.start) * 1.4 - 230.0) < 12.0
    assert abs((columns.stop - columns.start) * 1.4 - 320.0) < 12.0
    assert rows.stop < 190
    assert box[0] == slice(0, hu.shape[0])


def test_body_box_is_none_for_air() -> None:
    assert body_box(np.full((10, 20, 20), -1000.0, dtype=np.float32), (2.5, 0.7, 0.7)) is None


def test_three_mm_grid_is_centred_on_the_crop_and_averages_by_overlap() -> None:
    grid = _CropGrid((slice(0, 10), slice(5, 25), slice(0, 43)), (2.5, 0.7, 0.7))

    assert grid.shape == (9, 5, 11)  # ceil(25 / 3), ceil(14 / 3), ceil(30.1 / 3)
    assert grid.offset_mm(0) == pytest.approx((25.0 - 27.0) / 2)
    for axis in range(3):
        _, weight = grid.area_weights(axis)
        assert np.allclose(weight.sum(axis=1), 1.0)


def test_constant_ct_becomes_the_windowed_constant_on_the_three_mm_grid() -> None:
    grid = _CropGrid((slice(0, 12), slice(0, 30), slice(0, 40)), (2.5, 0.7, 0.7))
    tissue = to_network_grid(np.full((12, 30, 40), 50.0, dtype=np.float32), grid)
    air = to_network_grid(np.full((12, 30, 40), -1000.0, dtype=np.float32), grid)

    assert tissue.shape == grid.shape and tissue.dtype == np.float32
    assert np.allclose(tissue, 0.125)  # clip(50 / 1000, -0.2, 0.2) * 2.5
    assert np.allclose(air, -0.5)


def test_mask_returns_to_the_working_voxels_it_covers() -> None:
    grid = _CropGrid((slice(0, 24), slice(0, 60), slice(0, 60)), (2.5, 0.7, 0.7))  # 60 x 42 x 42 mm
    mask = np.zeros(grid.shape, dtype=bool)
    mask[:, :, : grid.shape[2] // 2] = True  # first half along the last axis: 21 mm of 42

    working = np.zeros((24, 60, 60), dtype=bool)
    grid.to_working(mask, out=working)
    everywhere = np.zeros((24, 60, 60), dtype=bool)
    grid.to_working(np.ones(grid.shape, dtype=bool), out=everywhere)

    assert np.all(working[:, :, :29]) and not np.any(working[:, :, 31:])
    assert np.all(everywhere)


# --------------------------------------------------------------------------------------------
# tiles and post-processing


def test_a_crop_that_fits_gets_one_centred_tile_of_the_trained_size() -> None:
    (tile,) = tiles((97, 79, 69))
    assert tile.size == TRAINED_OUTPUT
    assert tile.start == (97 // 2 - 163 // 2, 79 // 2 - 136 // 2, 69 // 2 - 136 // 2)


def test_long_axes_are_covered_by_overlapping_tiles() -> None:
    found = tiles((100, 80, 420))
    starts = sorted(tile.start[2] for tile in found)
    assert len(found) == len(starts) >= 3
    assert starts[0] == 0 and starts[-1] + TRAINED_OUTPUT[2] == 420
    assert all(b - a <= TRAINED_OUTPUT[2] - TILE_OVERLAP for a, b in itertools.pairwise(starts))


def test_tile_input_holds_context_and_zero_padding() -> None:
    image = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) + 1.0
    tile = Tile((-2, 0, 1), (4, 4, 4))

    patch = tile.input_patch(image)

    assert patch.shape == (4 + 2 * CONTEXT,) * 3
    assert patch[CONTEXT + 2, CONTEXT, CONTEXT] == image[0, 0, 1]
    assert patch.sum() == pytest.approx(image[:, :, :].sum())  # everything else is zero padding
    crop, output = tile.inside(image.shape)
    assert crop == (slice(0, 2), slice(0, 4), slice(1, 5)) and output == (slice(2, 4), slice(0, 4), slice(0, 4))


def test_postprocessing_keeps_the_largest_blob_only() -> None:
    probability = np.zeros((30, 30, 30), dtype=np.float32)
    probability[5:20, 5:20, 5:20] = 0.9
    probability[24:28, 24:28, 24:28] = 0.9
    probability[10, 10, 25] = 0.99  # a single voxel: gone after the erosion

    liver = postprocess(probability)

    assert liver[12, 12, 12] and not liver[26, 26, 26] and not liver[10, 10, 25]
    assert liver.sum() == pytest.approx(15**3, rel=0.05)


# --------------------------------------------------------------------------------------------
# construction


def test_backend_without_fetched_weights_says_how_to_fetch_them(tmp_path: Path) -> None:
    with pytest.raises(LiverfatError, match="liverfat models fetch") as raised:
        DefaultBackend(cache_dir=tmp_path)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE


def test_backend_refuses_a_weight_file_with_another_checksum(tmp_path: Path) -> None:
    (tmp_path / WEIGHTS_FILENAME).write_bytes(b"\x89HDF\r\n")
    with pytest.raises(LiverfatError, match="SHA-256") as raised:
        DefaultBackend(weights=tmp_path / WEIGHTS_FILENAME)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_backend_unavailable(default_weights: Path) -> None:
    with pytest.raises(LiverfatError, match="CUDA") as raised:
        DefaultBackend(device="cuda")
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE


def test_backend_describes_itself(default_weights: Path) -> None:
    backend = DefaultBackend(device="cpu")
    assert isinstance(backend, Backend)
    assert backend.info.name == MODEL_NAME
    assert backend.info.checksum == f"sha256:{WEIGHTS_SHA256}"
    assert backend.info.device == "cpu"


def test_a_volume_without_a_body_gives_an_empty_mask_without_running_the_network(default_weights: Path) -> None:
    air = Volume(np.full((8, 30, 30), -1000.0, dtype=np.float32), (0.7, 0.7, 2.5), (0.0, 0.0, 0.0))
    mask = DefaultBackend(device="cpu").predict(air)
    assert mask.array.dtype == bool and not mask.array.any() and mask.same_grid(air)


# --------------------------------------------------------------------------------------------
# the real network


@pytest.fixture(scope="module")
def backend(default_weights: Path) -> DefaultBackend:
    return DefaultBackend(device="cpu")


@pytest.fixture(scope="module")
def phantom_prediction(backend: DefaultBackend) -> tuple[Volume, Volume, Volume]:
    """(CT, analytic liver, predicted mask) of the fat-body phantom, liver on the patient's right."""
    ct, truth = render_volume(FAT_BODY_PHANTOM, _phantom_grid())
    return ct, truth, backend.predict(ct)


@pytest.mark.slow
def test_phantom_liver_is_found_on_the_patients_right(phantom_prediction: tuple[Volume, Volume, Volume]) -> None:
    ct, truth, mask = phantom_prediction

    assert mask.array.dtype == bool and mask.same_grid(ct)
    assert _dice(mask.array, truth.array) > 0.9
    centroid = ct.to_lps(np.argwhere(mask.array)[:, ::-1].mean(axis=0))
    assert centroid[0] < -40.0  # LPS x < 0 is the patient's right; the liver's centre is at -65 mm


@pytest.mark.slow
def test_prediction_is_deterministic_and_writes_no_temporary_files(
    backend: DefaultBackend,
    phantom_prediction: tuple[Volume, Volume, Volume],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ct, _, mask = phantom_prediction
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    again = backend.predict(ct)

    assert np.array_equal(again.array, mask.array)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_same_patient_stored_with_flipped_rows_and_columns_gives_the_same_physical_mask(
    backend: DefaultBackend, phantom_prediction: tuple[Volume, Volume, Volume]
) -> None:
    ct, _, mask = phantom_prediction
    flipped_ct = _stored_with_flipped_rows_and_columns(ct)
    assert np.allclose(flipped_ct.to_lps([3, 4, 5]), ct.to_lps([ct.size[0] - 4, ct.size[1] - 5, 5]))

    flipped = backend.predict(flipped_ct).array[:, ::-1, ::-1]

    assert _dice(mask.array, flipped) > 0.995


@pytest.mark.slow
def test_ircadb_liver_matches_the_manual_mask(backend: DefaultBackend, shared_data: Path) -> None:
    folder = shared_data / "3dircadb-1.1"
    (series,) = discover([folder / "PATIENT_DICOM"]).series
    ct = to_working_grid(load_series(series).volume)
    reference = read_mask(folder / "MASKS_DICOM" / "liver", ct)

    mask = backend.predict(ct)

    assert _dice(mask.array, reference.array) >= 0.95  # measured 0.967
    assert np.median(ct.array[mask.array]) > 90.0  # portal-venous phase: liver about 110 HU


@pytest.mark.slow
def test_totalsegmentator_example_liver_matches_its_label(backend: DefaultBackend, shared_data: Path) -> None:
    folder = shared_data / "totalsegmentator-example"
    ct = to_working_grid(read_nifti(folder / "example_ct_sm.nii.gz").volume)
    reference = read_mask_file(folder / "example_seg.nii.gz", ct, label=TOTALSEGMENTATOR_LIVER_LABEL)

    mask = backend.predict(ct)

    # the reference is TotalSegmentator's own output, not a manual truth; measured 0.96
    assert _dice(mask.array, reference.array) >= 0.93
    assert 30.0 < np.median(ct.array[mask.array]) < 70.0  # an unenhanced-looking liver, about 46 HU


def test_second_pass_box_ends_70_mm_above_the_liver_dome_of_a_tall_chest_scan() -> None:
    spacing = (2.5, 0.7, 0.7)
    liver = np.zeros((160, 20, 20), dtype=bool)
    liver[0:30, 5:15, 5:15] = True  # the liver in the lowest 75 mm of a 400 mm scan
    body = (slice(0, 160), slice(2, 18), slice(1, 19))
    orientation = _Orientation.of(Volume(liver, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0)))

    box = liver_centred_box(liver, body, spacing, orientation)

    assert box == (slice(0, 30 + 28), body[1], body[2])  # 28 slices = 70 mm above the top liver slice


def test_second_pass_box_follows_feet_first_storage() -> None:
    spacing = (2.5, 0.7, 0.7)
    liver = np.zeros((160, 20, 20), dtype=bool)
    liver[130:160, 5:15, 5:15] = True  # k grows toward the feet: the liver at the high indices
    direction = np.diag([1.0, 1.0, -1.0])
    orientation = _Orientation.of(Volume(liver, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0), direction))

    box = liver_centred_box(liver, (slice(0, 160), slice(0, 20), slice(0, 20)), spacing, orientation)

    assert box is not None and box[0] == slice(130 - 28, 160)


def test_no_second_pass_for_an_abdominal_scan_or_without_liver() -> None:
    spacing = (2.5, 0.7, 0.7)
    orientation = _Orientation.of(Volume(np.zeros((60, 4, 4), dtype=bool), (0.7, 0.7, 2.5), (0.0, 0.0, 0.0)))
    body = (slice(0, 60), slice(0, 4), slice(0, 4))
    liver = np.zeros((60, 4, 4), dtype=bool)
    assert liver_centred_box(liver, body, spacing, orientation) is None
    liver[10:40] = True  # dome 20 slices (50 mm) below the top: the box would not shrink
    assert liver_centred_box(liver, body, spacing, orientation) is None
