"""The nnunetv2 backend, run on tiny nnU-Net v2 model folders built and saved with nnU-Net's own code."""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.backend import Backend
from liverfat.inference.models.nnunet import (
    NnUNetBackend,
    find_liver_label,
    inspect_model_folder,
    mask_from_nnunet,
    network_orientation,
    nnunet_input,
)
from liverfat.volume import Volume
from tests.inference.tiny_nnunet import MODEL_SPACING_ZYX, TinyFold, TinyModel, write_tiny_model
from tests.phantom import Ellipsoid, Grid, Phantom, render_volume

NNUNET_READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient", "SimpleITKIOWithReorient")
MIN_DICE = 0.98  # measured 0.995: only the liver surface moves through nnU-Net's resampling to 1.4 mm and back

# A small body with the liver on the patient's right (negative LPS x), off-centre in every axis,
# so that a flipped axis moves it; no noise, so the tiny model's HU threshold finds it exactly.
SMALL_PHANTOM = Phantom(
    noise_sd_hu=0.0,
    body=Ellipsoid((0.0, 0.0, 0.0), (42.0, 38.0, 200.0), 35.0),
    liver=Ellipsoid((-15.0, -4.0, 3.0), (20.0, 22.0, 18.0), 100.0),
    spleen=Ellipsoid((25.0, 10.0, 5.0), (8.0, 10.0, 10.0), 48.0),
)
WORKING_GRID = Grid(rows=128, columns=128, pixel_spacing_mm=0.7, slice_positions_mm=tuple(np.arange(-30.0, 30.1, 2.5)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def phantom_ct() -> tuple[Volume, Volume]:
    """(CT in HU, true liver mask) on an identity-direction 0.7 x 0.7 x 2.5 mm grid."""
    return render_volume(SMALL_PHANTOM, WORKING_GRID)


@pytest.fixture(scope="module")
def two_label_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labels background, spleen, liver (liver = 2): the liver must be found by name."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "spleen_liver")


@pytest.fixture(scope="module")
def two_label_backend(two_label_model: Path) -> NnUNetBackend:
    return NnUNetBackend(two_label_model, device="cpu")


# --- axis order -----------------------------------------------------------------------------


@pytest.mark.parametrize("reader", NNUNET_READERS)
def test_nnunet_input_is_what_nnunets_reader_gives_for_a_nifti_written_by_simpleitk(
    reader: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    ct = Volume(rng.normal(0, 100, size=(5, 6, 7)).astype(np.float32), (0.7, 0.8, 2.5), (-10.0, 20.0, -30.0))
    path = tmp_path / "ct_0000.nii.gz"
    sitk.WriteImage(ct.to_sitk(), str(path))

    expected, expected_properties = recursive_find_reader_writer_by_name(reader)().read_images([str(path)])
    array, properties = nnunet_input(ct, network_orientation(reader))

    assert array.shape == expected.shape == (1, 5, 6, 7)
    assert np.array_equal(array, expected.astype(np.float32))
    assert np.allclose(properties["spacing"], expected_properties["spacing"])
    assert np.allclose(properties["spacing"], [2.5, 0.8, 0.7])


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_mask_from_nnunet_undoes_nnunet_input(orientation: str) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    ct = Volume(array, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0))

    network_view, _ = nnunet_input(ct, orientation)

    assert np.array_equal(mask_from_nnunet(network_view[0], orientation), array)


def test_orientation_follows_the_reader_unless_given() -> None:
    assert network_orientation("SimpleITKIO") == "LPS"
    assert network_orientation("NibabelIOWithReorient") == "RAS"
    assert network_orientation("SimpleITKIO", "RAS") == "RAS"
    with pytest.raises(LiverfatError, match="unknown nnU-Net input orientation 'RSA'"):
        network_orientation("SimpleITKIO", "RSA")


def test_reorienting_readers_see_the_patients_right_at_low_x() -> None:
    # voxel i = 0 of an identity LPS grid is the patient's right-most column; in RAS order it is last
    array = np.zeros((1, 1, 4))
    array[0, 0, 0] = 1.0
    ct = Volume(array, (0.7, 0.7, 2.5), (0.0, 0.0, 0.0))

    ras, _ = nnunet_input(ct, "RAS")
    stored, _ = nnunet_input(ct, "LPS")

    assert ras[0, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert stored[0, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_nnunet_input_refuses_a_grid_that_is_not_identity_lps() -> None:
    feet_first = np.diag([1.0, 1.0, -1.0])
    ct = Volume(np.zeros((2, 2, 2)), (0.7, 0.7, 2.5), (0.0, 0.0, 0.0), feet_first)

    with pytest.raises(ValueError, match="identity-direction LPS"):
        nnunet_input(ct, "LPS")


def test_seed_working_grid_nifti_reads_into_nnunet_as_our_volume_array(shared_data: Path) -> None:
    path = shared_data / "seed-dl-parenchymal" / "LIDC-IDRI_0002_3d_liver_seg.nii.gz"
    volume = Volume.from_sitk(sitk.ReadImage(str(path)))

    seen_by_nnunet, properties = recursive_find_reader_writer_by_name("SimpleITKIO")().read_images([str(path)])
    ours, our_properties = nnunet_input(volume, network_orientation("SimpleITKIO"))

    assert np.allclose(volume.direction, np.eye(3))
    assert np.array_equal(ours, seen_by_nnunet)
    assert np.allclose(our_properties["spacing"], properties["spacing"])


# --- liver label ----------------------------------------------------------------------------


def test_liver_label_is_found_by_name_in_any_case() -> None:
    assert find_liver_label({"background": 0, "spleen": 1, "Liver": 2, "liver_vessels": 3}) == ("Liver", (2,))


def test_model_without_a_liver_label_is_refused() -> None:
    with pytest.raises(LiverfatError, match="found none among 'background', 'spleen'") as caught:
        find_liver_label({"background": 0, "spleen": 1})
    assert caught.value.reason is Reason.BACKEND_UNAVAILABLE


def test_model_with_two_liver_labels_is_refused() -> None:
    with pytest.raises(LiverfatError, match="found 'liver', 'LIVER'") as caught:
        find_liver_label({"background": 0, "liver": 1, "LIVER": 2})
    assert caught.value.reason is Reason.BACKEND_UNAVAILABLE


def test_region_model_liver_includes_the_regions_nested_in_it() -> None:
    labels = {"background": 0, "liver": [1, 2], "tumour": [2], "kidney": [3, 4]}

    assert find_liver_label(labels, regions_class_order=[1, 2, 3]) == ("liver", (1, 2))


# --- model folder ---------------------------------------------------------------------------


def test_folder_without_plans_is_not_an_nnunet_folder(two_label_model: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(two_label_model, tmp_path / "broken")
    (broken / "plans.json").unlink()

    with pytest.raises(LiverfatError, match="not an nnU-Net v2 trained-model folder: plans.json missing") as caught:
        inspect_model_folder(broken)
    assert caught.value.reason is Reason.BACKEND_UNAVAILABLE


def test_dataset_folder_above_one_trained_model_folder_is_accepted(two_label_model: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "Dataset901_TinyLiver"
    trained = shutil.copytree(two_label_model, dataset / "nnUNetTrainer__nnUNetPlans__3d_fullres")

    assert inspect_model_folder(dataset).path == trained


def test_folder_with_only_best_checkpoints_needs_checkpoint_best(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "best_only", TinyModel(checkpoint_name="checkpoint_best.pth"))

    with pytest.raises(LiverfatError, match=r"no fold_N/checkpoint_final.pth; found fold_0/checkpoint_best.pth"):
        inspect_model_folder(folder)
    assert inspect_model_folder(folder, checkpoint_name="checkpoint_best.pth").folds == (0,)


def test_default_folds_are_the_numbered_folds_present(tmp_path: Path) -> None:
    folder = write_tiny_model(tmp_path / "m", TinyModel(folds={3: TinyFold(), 0: TinyFold(), "all": TinyFold()}))
    only_all = write_tiny_model(tmp_path / "a", TinyModel(folds={"all": TinyFold()}))

    assert inspect_model_folder(folder).folds == (0, 3)
    assert inspect_model_folder(only_all).folds == ("all",)


def test_requested_fold_that_is_absent_is_refused(two_label_model: Path) -> None:
    expected = r"fold\(s\) 4 requested .* fold_4/checkpoint_final.pth \(folds present: 0\)"
    with pytest.raises(LiverfatError, match=expected):
        inspect_model_folder(two_label_model, folds=[0, 4])


def test_model_with_two_input_channels_is_refused(two_label_model: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(two_label_model, tmp_path / "two_channels")
    text = (folder / "dataset.json").read_text().replace('"0": "CT"', '"0": "CT", "1": "PET"')
    (folder / "dataset.json").write_text(text)

    with pytest.raises(LiverfatError, match="expects 2 input channels"):
        inspect_model_folder(folder)


# --- prediction -----------------------------------------------------------------------------


def test_predict_returns_the_liver_label_as_a_bool_mask_on_the_input_grid(
    two_label_backend: NnUNetBackend, phantom_ct: tuple[Volume, Volume]
) -> None:
    ct, truth = phantom_ct

    mask = two_label_backend.predict(ct)

    assert isinstance(two_label_backend, Backend)
    assert mask.array.dtype == np.bool_
    assert mask.same_grid(ct)
    assert dice(mask.array, truth.array) > MIN_DICE


def test_predict_with_a_ras_reorienting_model_keeps_the_liver_on_the_patients_right(
    phantom_ct: tuple[Volume, Volume], tmp_path: Path
) -> None:
    model = TinyModel(labels={"background": 0, "Liver": 1}, liver_label="Liver", reader_writer="NibabelIOWithReorient")
    ct, truth = phantom_ct

    backend = NnUNetBackend(write_tiny_model(tmp_path / "ras", model), device="cpu", use_mirroring=False)
    mask = backend.predict(ct)

    assert backend.folder.orientation == "RAS"
    assert dice(mask.array, truth.array) > MIN_DICE


def test_orientation_option_overrides_the_reader(two_label_model: Path, phantom_ct: tuple[Volume, Volume]) -> None:
    ct, truth = phantom_ct

    backend = NnUNetBackend(two_label_model, device="cpu", use_mirroring=False, orientation="RAS")

    assert backend.info.version.endswith("; input RAS")
    assert dice(backend.predict(ct).array, truth.array) > MIN_DICE


def test_folds_option_chooses_which_checkpoints_are_ensembled(
    phantom_ct: tuple[Volume, Volume], tmp_path: Path
) -> None:
    # fold 0 finds the liver; fold 1 calls every voxel liver and dominates any average with fold 0
    model = TinyModel(folds={0: TinyFold(), 1: TinyFold(liver_bias=100.0)})
    folder = write_tiny_model(tmp_path / "two_folds", model)
    ct, truth = phantom_ct

    fold0 = NnUNetBackend(folder, device="cpu", folds=[0], use_mirroring=False)
    fold1 = NnUNetBackend(folder, device="cpu", folds=["1"], use_mirroring=False)
    both = NnUNetBackend(folder, device="cpu", use_mirroring=False)

    assert dice(fold0.predict(ct).array, truth.array) > MIN_DICE
    assert fold1.predict(ct).array.all()
    assert both.predict(ct).array.all()
    assert len(both.predictor.list_of_parameters) == 2
    assert "folds 0,1;" in both.info.version


def test_mirroring_option_reaches_the_predictor(phantom_ct: tuple[Volume, Volume], tmp_path: Path) -> None:
    # this fold's output is shifted by one model voxel along x; nnU-Net's mirroring averages the
    # shift with its mirror image, which centres the mask again
    folder = write_tiny_model(tmp_path / "shifted", TinyModel(folds={0: TinyFold(shift_voxels=1)}))
    ct, truth = phantom_ct
    model_voxel_in_working_voxels = MODEL_SPACING_ZYX[2] / ct.spacing[0]

    mirrored = NnUNetBackend(folder, device="cpu", use_mirroring=True, tile_step_size=0.75)
    plain = NnUNetBackend(folder, device="cpu", use_mirroring=False)
    offset_mirrored = np.argwhere(mirrored.predict(ct).array).mean(0) - np.argwhere(truth.array).mean(0)
    offset_plain = np.argwhere(plain.predict(ct).array).mean(0) - np.argwhere(truth.array).mean(0)

    assert (mirrored.predictor.use_mirroring, plain.predictor.use_mirroring) == (True, False)
    assert mirrored.predictor.tile_step_size == 0.75
    assert abs(offset_mirrored[2]) < 0.25 * model_voxel_in_working_voxels
    assert abs(offset_plain[2]) == pytest.approx(model_voxel_in_working_voxels, rel=0.25)


def test_info_names_the_model_and_hashes_the_checkpoints_used(
    two_label_backend: NnUNetBackend, two_label_model: Path
) -> None:
    expected = hashlib.sha256((two_label_model / "fold_0" / "checkpoint_final.pth").read_bytes()).hexdigest()
    info = two_label_backend.info

    assert info.name == "spleen_liver (Dataset901_TinyLiver)"
    assert info.version == (
        f"nnunetv2 {importlib.metadata.version('nnunetv2')}; nnUNetTrainer__nnUNetPlans__3d_fullres; "
        "folds 0; checkpoint_final.pth; input LPS"
    )
    assert info.checksum == f"sha256:{expected}"
    assert info.device == "cpu"


def test_loading_a_model_prints_nothing_on_stdout(two_label_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    NnUNetBackend(two_label_model, device="cpu")

    assert capsys.readouterr().out == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nnU-Net changes cudnn.benchmark only for CUDA devices")
def test_loading_on_cuda_leaves_cudnn_benchmark_as_it_was(
    two_label_model: Path, phantom_ct: tuple[Volume, Volume]
) -> None:
    torch.backends.cudnn.benchmark = False
    ct, truth = phantom_ct

    backend = NnUNetBackend(two_label_model, device="cuda")

    assert torch.backends.cudnn.benchmark is False
    assert backend.info.device is not None and backend.info.device.startswith("cuda:0 (")
    assert dice(backend.predict(ct).array, truth.array) > MIN_DICE


def test_tile_step_size_outside_zero_to_one_is_refused(two_label_model: Path) -> None:
    with pytest.raises(ValueError, match="tile_step_size"):
        NnUNetBackend(two_label_model, device="cpu", tile_step_size=0.0)


def test_folder_from_the_same_model_with_another_label_order_selects_the_liver(
    phantom_ct: tuple[Volume, Volume], tmp_path: Path
) -> None:
    model = replace(TinyModel(), labels={"background": 0, "liver": 1, "spleen": 2})
    ct, truth = phantom_ct

    backend = NnUNetBackend(write_tiny_model(tmp_path / "liver_first", model), device="cpu", use_mirroring=False)
    mask = backend.predict(ct)

    assert dice(mask.array, truth.array) > MIN_DICE
