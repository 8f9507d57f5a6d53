"""Importing nnU-Net v1 models (the seed's), checked against nnU-Net v1 itself.

The slow tests build small randomly initialised v1 models with nnU-Net v1's own code and
segment CTs with v1's own ``predict_from_folder``, in a subprocess
(:mod:`tests.inference.nnunet_v1_reference`); they need the test-only install of
``nnunet==1.7.1`` (see ``docs/seed-model.md``) and skip without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.nnunet import NnUNetBackend, nnunet_input
from liverfat.inference.models.nnunet_v1 import (
    PROVENANCE_FILE,
    import_command,
    import_nnunet_v1,
    load_v1_checkpoint,
    load_v1_pickle,
)
from liverfat.inference.models.nnunet_v1_network import V1_NETWORK_CLASS_NAME
from liverfat.inference.models.nnunet_v1_predictor import (
    V1_PLANS_KEY,
    V1Inference,
    remove_all_but_largest_regions,
    seed_largest_component,
)
from liverfat.inference.models.registry import load_backend, store_models
from liverfat.volume import Volume
from tests.inference.tiny_nnunet import write_tiny_model
from tests.phantom import Ellipsoid, Grid, Phantom, render_volume

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_TRAINER = Path("nnUNet", "3d_fullres", "Task521_liver", "nnUNetTrainerV2__nnUNetPlansv2.1")
OTHER_TRAINER = Path("nnUNet", "3d_fullres", "Task003_Liver", "nnUNetTrainerV2__nnUNetPlansv2.1")
V1_INSTALL = "pip install -c constraints.txt --no-deps nnunet==1.7.1 medpy==0.5.2"
V1_TIMEOUT_S = 1200

PHANTOM = Phantom(
    noise_sd_hu=20.0,
    body=Ellipsoid((0.0, 0.0, 0.0), (24.0, 20.0, 200.0), 35.0),
    liver=Ellipsoid((-8.0, -3.0, 2.0), (11.0, 12.0, 12.0), 60.0),
    spleen=Ellipsoid((12.0, 6.0, 4.0), (5.0, 6.0, 7.0), 48.0),
)


@dataclass(frozen=True)
class Case:
    """A CT grid: in-plane pixel and slice spacing (mm), size, and a rim of exactly 0 HU (cropped by nnU-Net)."""

    pixel_mm: float
    slice_mm: float
    columns: int
    slices: int
    zero_rim: bool = False


CASES = {
    "model_spacing": Case(0.7, 2.5, 36, 10),  # the seed's working grid: no resampling, 8 tiles
    "coarser_with_zero_rim": Case(0.9, 3.0, 28, 8, zero_rim=True),  # cropped, then resampled up
    "isotropic": Case(1.5, 1.5, 16, 16),  # the model's spacing decides separate-z resampling
    "thick_slices": Case(0.6, 5.0, 40, 5),  # the input's spacing decides separate-z resampling
    "smaller_than_a_tile": Case(0.7, 2.5, 24, 6),  # padded, one tile: no Gaussian weighting
}


def ct_case(case: Case) -> Volume:
    grid = Grid(
        rows=case.columns,
        columns=case.columns,
        pixel_spacing_mm=case.pixel_mm,
        slice_positions_mm=tuple((np.arange(case.slices) - case.slices / 2) * case.slice_mm),
    )
    ct, _ = render_volume(PHANTOM, grid)
    if not case.zero_rim:
        return ct
    array = ct.array.copy()
    array[:, :2] = 0.0
    array[:, :, -3:] = 0.0
    return ct.with_array(array)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class V1Run:
    results: Path  # RESULTS_FOLDER with both v1 models
    inputs: Path  # <case>_0000.nii.gz
    outputs: Path  # <case>.nii.gz, v1's segmentation


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory: pytest.TempPathFactory) -> V1Run:
    """v1 models built by nnU-Net v1 and its segmentations of every case, made in a subprocess."""
    if importlib.util.find_spec("nnunet") is None:
        pytest.skip(f"nnU-Net v1 is not installed (test-only): {V1_INSTALL}")
    root = tmp_path_factory.mktemp("nnunet_v1")
    run = V1Run(root / "results", root / "inputs", root / "outputs")
    run.inputs.mkdir()
    for name, case in CASES.items():
        sitk.WriteImage(ct_case(case).to_sitk(), str(run.inputs / f"{name}_0000.nii.gz"))
    env = {
        **os.environ,
        "nnUNet_raw_data_base": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "RESULTS_FOLDER": str(run.results),
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",  # v1 loads its own checkpoints unsafely: reference only
        "CUDA_VISIBLE_DEVICES": "",  # v1 would take a GPU (and float16) by itself; liverfat runs on the CPU here
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "tests.inference.nnunet_v1_reference", str(run.results), str(run.inputs), str(run.outputs)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=V1_TIMEOUT_S)
    assert done.returncode == 0, f"nnU-Net v1 failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def imported(v1_run: V1Run, store: Path) -> Path:
    return import_nnunet_v1(v1_run.results, name="seed", store=store)


@pytest.fixture(scope="module")
def backend(imported: Path, store: Path) -> NnUNetBackend:
    loaded = load_backend("seed", device="cpu", store=store)
    assert isinstance(loaded, NnUNetBackend)
    return loaded


# --- the imported model gives v1's masks -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_imported_model_segments_exactly_as_nnunet_v1(name: str, v1_run: V1Run, backend: NnUNetBackend) -> None:
    ct = Volume.from_sitk(sitk.ReadImage(str(v1_run.inputs / f"{name}_0000.nii.gz")))
    v1_image = sitk.ReadImage(str(v1_run.outputs / f"{name}.nii.gz"))
    v1_labels = sitk.GetArrayFromImage(v1_image)

    labels = backend.predictor.predict_single_npy_array(*nnunet_input(ct, backend.folder.orientation))

    assert 0.2 < v1_labels.mean() < 0.8  # the random model leaves plenty of boundary to disagree on
    assert labels.shape == v1_labels.shape
    assert int(np.count_nonzero(labels != v1_labels)) == 0
    v1_grid = Volume.from_sitk(v1_image)  # v1 writes its mask on its input's grid, as liverfat does
    assert np.array_equal(v1_grid.spacing, ct.spacing)
    assert np.array_equal(v1_grid.origin, ct.origin)
    assert np.array_equal(v1_grid.direction, ct.direction)


@pytest.mark.slow
def test_backend_mask_is_v1s_mask_after_the_seeds_largest_component_step(
    v1_run: V1Run, backend: NnUNetBackend
) -> None:
    ct = Volume.from_sitk(sitk.ReadImage(str(v1_run.inputs / "model_spacing_0000.nii.gz")))
    v1_grid = Volume.from_sitk(sitk.ReadImage(str(v1_run.outputs / "model_spacing.nii.gz")))

    mask = backend.predict(ct)

    assert mask.array.dtype == np.bool_
    assert mask.same_grid(v1_grid, tolerance_mm=0.0)
    assert np.array_equal(mask.array, seed_largest_component(v1_grid.array == 1))
    assert backend.info.version.endswith("; nnU-Net v1 inference")


@pytest.mark.slow
def test_stock_plain_conv_unet_cannot_load_the_weights_of_anisotropic_v1_plans(imported: Path) -> None:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    architecture = json.loads((imported / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    weights = torch.load(imported / "fold_1" / "checkpoint_final.pth", weights_only=True)["network_weights"]
    stock = get_network_from_plans(
        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        architecture["arch_kwargs"], architecture["_kw_requires_import"], 1, 2, deep_supervision=False,
    )

    assert isinstance(stock, PlainConvUNet) and architecture["network_class_name"] == V1_NETWORK_CLASS_NAME
    with pytest.raises(RuntimeError, match="size mismatch for decoder.stages.1.convs.0.conv.weight"):
        stock.load_state_dict(weights)


# --- the v2 folder and its provenance --------------------------------------------------------------


@pytest.mark.slow
def test_import_writes_v2_plans_from_the_v1_stage_and_dataset_properties(v1_run: V1Run, imported: Path) -> None:
    v1_plans = load_v1_pickle(v1_run.results / SEED_TRAINER / "plans.pkl")
    v1_intensity = v1_plans["dataset_properties"]["intensityproperties"][0]
    plans = json.loads((imported / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]

    assert configuration["spacing"] == [2.5, 0.7, 0.7]
    assert configuration["patch_size"] == [8, 32, 32]
    assert configuration["architecture"]["arch_kwargs"]["kernel_sizes"] == [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert plans["transpose_forward"] == plans["transpose_backward"] == [0, 1, 2]
    assert plans["foreground_intensity_properties_per_channel"]["0"]["std"] == float(v1_intensity["sd"])
    assert plans[V1_PLANS_KEY]["postprocessing_classes"] == [[1]]
    assert json.loads((imported / "dataset.json").read_text())["labels"] == {"background": 0, "liver": 1}
    assert sorted(p.relative_to(imported).as_posix() for p in imported.rglob("*") if p.is_file()) == [
        "dataset.json", "fold_1/checkpoint_final.pth", "liverfat_provenance.json", "plans.json",
    ]


@pytest.mark.slow
def test_provenance_records_the_source_checksums_and_the_v1_plans_identity(v1_run: V1Run, imported: Path) -> None:
    provenance = json.loads((imported / PROVENANCE_FILE).read_text())
    trainer = v1_run.results / SEED_TRAINER
    read = ["plans.pkl", "postprocessing.json", "fold_1/model_final_checkpoint.model", "fold_1/model_final_checkpoint.model.pkl"]
    expected = {f"{SEED_TRAINER.as_posix()}/{name}": sha256(trainer / name) for name in read}
    manifest = "".join(f"{digest}  {name}\n" for name, digest in sorted(expected.items()))

    assert provenance["source"]["kind"] == "folder"
    assert provenance["source"]["files_sha256"] == expected
    assert provenance["source"]["sha256"] == hashlib.sha256(manifest.encode()).hexdigest()
    assert provenance["nnunet_v1"] | {"postprocessing": None} == {
        "task": "Task521_liver",
        "configuration": "3d_fullres",
        "trainer": "nnUNetTrainerV2",
        "plans_identifier": "nnUNetPlansv2.1",
        "data_identifier": "nnUNetData_plans_v2.1",
        "stage": 1,
        "fold": 1,
        "checkpoint": "model_final_checkpoint.model",
        "epoch": 1,
        "plans_sha256": sha256(trainer / "plans.pkl"),
        "postprocessing": None,
    }


@pytest.mark.slow
def test_import_from_the_published_zip_gives_the_same_weights(v1_run: V1Run, imported: Path, tmp_path: Path) -> None:
    archive = tmp_path / "nnUNet_trained_models.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted((v1_run.results / SEED_TRAINER).rglob("*")):
            if path.is_file():
                out.write(path, Path("nnUNet_trained_models") / path.relative_to(v1_run.results))

    zipped = import_nnunet_v1(archive, name="zipped", store=tmp_path / "store")
    provenance = json.loads((zipped / PROVENANCE_FILE).read_text())
    from_zip = torch.load(zipped / "fold_1" / "checkpoint_final.pth", weights_only=True)["network_weights"]
    from_folder = torch.load(imported / "fold_1" / "checkpoint_final.pth", weights_only=True)["network_weights"]

    assert provenance["source"] | {"files_sha256": None} == {
        "path": str(archive), "kind": "zip", "sha256": sha256(archive), "files_sha256": None,
    }
    assert from_zip.keys() == from_folder.keys()
    assert all(torch.equal(from_zip[key], from_folder[key]) for key in from_zip)
    assert store_models(tmp_path / "store") == ["zipped"]  # the staging folder is gone


@pytest.mark.slow
def test_importing_the_same_source_again_keeps_the_model_and_another_source_is_refused(
    v1_run: V1Run, imported: Path, store: Path
) -> None:
    before = (imported / PROVENANCE_FILE).read_text()

    again = import_nnunet_v1(v1_run.results, name="seed", store=store)
    with pytest.raises(LiverfatError, match="already has a model named 'seed'") as caught:
        import_nnunet_v1(v1_run.results / OTHER_TRAINER, name="seed", store=store, task=None)

    assert again == imported and (imported / PROVENANCE_FILE).read_text() == before
    assert caught.value.reason is Reason.MODEL_IMPORT_FAILED


@pytest.mark.slow
def test_import_command_says_where_the_model_went_and_how_to_select_it(v1_run: V1Run, tmp_path: Path) -> None:
    text = import_command(v1_run.results, None, tmp_path)

    assert f"is in the model store as {tmp_path / 'seed-task521'}." in text
    assert "--model seed-task521" in text
    assert '[model] name = "seed-task521"' in text
    assert "Task521_liver (3d_fullres, fold 1)" in text


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_model_of_another_task_is_refused(v1_run: V1Run, tmp_path: Path) -> None:
    with pytest.raises(LiverfatError, match="trained for Task003_Liver, expected Task521_liver") as caught:
        import_nnunet_v1(v1_run.results / OTHER_TRAINER, store=tmp_path)
    with pytest.raises(LiverfatError, match="2 foreground classes"):
        import_nnunet_v1(v1_run.results / OTHER_TRAINER, store=tmp_path, task=None)

    assert caught.value.reason is Reason.MODEL_IMPORT_FAILED
    assert store_models(tmp_path) == [] and list(tmp_path.iterdir()) == []


def fake_v1_folder(root: Path, folds: tuple[str, ...] = ("fold_1",), plans: bool = True) -> Path:
    """A v1 folder's layout with empty files: enough for the checks that come before reading anything."""
    trainer = root / SEED_TRAINER
    for fold in folds:
        (trainer / fold).mkdir(parents=True)
        (trainer / fold / "model_final_checkpoint.model").write_bytes(b"")
        (trainer / fold / "model_final_checkpoint.model.pkl").write_bytes(b"")
    if plans:
        (trainer / "plans.pkl").write_bytes(b"")
    return root


def test_missing_fold_is_refused_naming_the_folds_present(tmp_path: Path) -> None:
    source = fake_v1_folder(tmp_path / "results", folds=("fold_0", "fold_3"))

    with pytest.raises(LiverfatError, match=r"fold_1 is missing .* \(folds present: fold_0, fold_3\)") as caught:
        import_nnunet_v1(source, store=tmp_path / "store")
    assert caught.value.reason is Reason.MODEL_IMPORT_FAILED


def test_missing_plans_is_refused(tmp_path: Path) -> None:
    source = fake_v1_folder(tmp_path / "results", plans=False)

    with pytest.raises(LiverfatError, match="plans.pkl is missing"):
        import_nnunet_v1(source, store=tmp_path / "store")


def test_missing_checkpoint_is_refused(tmp_path: Path) -> None:
    source = fake_v1_folder(tmp_path / "results")
    (source / SEED_TRAINER / "fold_1" / "model_final_checkpoint.model").unlink()

    with pytest.raises(LiverfatError, match="fold_1/model_final_checkpoint.model is missing"):
        import_nnunet_v1(source, store=tmp_path / "store")


def test_folder_without_a_v1_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    v2_model = write_tiny_model(tmp_path / "v2")

    with pytest.raises(LiverfatError, match="is not an nnU-Net v1 model"):
        import_nnunet_v1(tmp_path / "empty", store=tmp_path / "store")
    with pytest.raises(LiverfatError, match="holds an nnU-Net v2 model .* --model PATH"):
        import_nnunet_v1(v2_model, store=tmp_path / "store")
    with pytest.raises(LiverfatError, match="does not exist"):
        import_nnunet_v1(tmp_path / "absent.zip", store=tmp_path / "store")


def test_model_name_must_be_a_plain_folder_name(tmp_path: Path) -> None:
    source = fake_v1_folder(tmp_path / "results")

    with pytest.raises(LiverfatError, match="must be a plain folder name"):
        import_nnunet_v1(source, name="../elsewhere", store=tmp_path / "store")


def test_hidden_folders_in_the_store_are_not_models(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / ".seed.importing-x1y2" / "model")
    write_tiny_model(tmp_path / "ready")

    assert store_models(tmp_path) == ["ready"]


# --- safe loading ----------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates a folder: what a hostile pickle could do instead."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.target),)


def test_pickle_with_a_forbidden_global_is_refused_without_running_it(tmp_path: Path) -> None:
    target = tmp_path / "created_by_pickle"
    path = tmp_path / "model_final_checkpoint.model.pkl"
    path.write_bytes(pickle.dumps({"init": (), "payload": Payload(target)}))

    with pytest.raises(LiverfatError, match=r"global 'posix.mkdir' is not allowed") as caught:
        load_v1_pickle(path)
    assert caught.value.reason is Reason.MODEL_IMPORT_FAILED
    assert not target.exists()


def test_pickle_written_by_numpy_1_is_read(tmp_path: Path) -> None:
    spacing = np.array([2.5, 0.7, 0.7])
    content = OrderedDict(spacing=spacing, mean=np.float32(55.5), sd=np.float64(41.0))
    numpy_2 = pickle.dumps(content, protocol=2)
    path = tmp_path / "plans.pkl"
    path.write_bytes(numpy_2.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))

    loaded = load_v1_pickle(path)

    assert b"numpy.core.multiarray\n" in path.read_bytes()
    assert isinstance(loaded, OrderedDict) and np.array_equal(loaded["spacing"], spacing)
    assert loaded["mean"] == np.float32(55.5) and loaded["mean"].dtype == np.float32


def test_checkpoint_with_numpy_scalars_named_by_numpy_1_is_read(tmp_path: Path) -> None:
    weights = {"conv.weight": torch.ones(2, 2)}
    path = tmp_path / "model_final_checkpoint.model"
    torch.save({"state_dict": weights, "best_stuff": (3, np.float64(-0.8))}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))

    checkpoint = load_v1_checkpoint(path)

    assert b"numpy.core.multiarray\n" in path.read_bytes()
    assert torch.equal(checkpoint["state_dict"]["conv.weight"], weights["conv.weight"])
    assert checkpoint["best_stuff"][1] == np.float64(-0.8)


def test_checkpoint_with_a_forbidden_global_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "created_by_checkpoint"
    path = tmp_path / "model_final_checkpoint.model"
    torch.save({"state_dict": {}, "payload": Payload(target)}, path)

    with pytest.raises(LiverfatError, match="cannot be loaded safely as weights"):
        load_v1_checkpoint(path)
    assert not target.exists()


# --- post-processing -------------------------------------------------------------------------------


def seed_reference(mask: np.ndarray) -> np.ndarray:
    """The seed's ``get_biggst_mask_array`` loop, written out with skimage's labelling as the seed ran it."""
    from skimage import measure

    labels = measure.label(mask.astype(np.uint8))
    threshold = labels.sum() * 0.03
    biggest = mask
    for label in range(1, labels.max() + 1):
        size = int((labels == label).sum())
        if size > threshold:
            biggest, threshold = labels == label, size
    return np.asarray(biggest, dtype=bool)


def test_seed_step_keeps_the_largest_component_counting_corner_neighbours() -> None:
    mask = np.zeros((6, 8, 8), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[2, 2, 2] = True  # touches the cube at a corner only: 9 voxels in 26-connectivity
    mask[4:6, 5:8, 5:8] = True  # 18 voxels... minus one below
    mask[5, 7, 7] = False  # 17

    kept = seed_largest_component(mask)

    assert int(kept.sum()) == 17 and kept[4, 5, 5]
    mask[4:6, 5:8, 5:8] = False
    assert int(seed_largest_component(mask).sum()) == 9


def test_seed_step_keeps_the_first_of_equal_components() -> None:
    mask = np.zeros((1, 4, 9), dtype=bool)
    mask[0, 1:3, 0:2] = True
    mask[0, 1:3, 6:8] = True

    kept = seed_largest_component(mask)

    assert kept[0, 1, 0] and not kept[0, 1, 6]


def test_seed_step_leaves_many_small_pieces_unchanged_as_the_seed_does() -> None:
    mask = np.zeros((1, 40, 40), dtype=bool)
    mask[0, ::2, ::2] = True  # 400 isolated voxels: none exceeds 3 % of the sum of labels
    mask[0, 0:2, 0:2] = True  # one piece of 3

    assert np.array_equal(seed_largest_component(mask), mask)


@pytest.mark.parametrize("seed", range(4))
def test_seed_step_matches_the_seeds_own_loop_on_random_masks(seed: int) -> None:
    mask = np.random.default_rng(seed).random((8, 24, 24)) < 0.2 + 0.1 * seed

    assert np.array_equal(seed_largest_component(mask), seed_reference(mask))


def test_v1_postprocessing_keeps_the_largest_face_connected_component_and_ties() -> None:
    labels = np.zeros((1, 6, 10), dtype=np.uint8)
    labels[0, 0:2, 0:2] = 1  # 4 voxels
    labels[0, 2, 2] = 1  # corner neighbour: a separate component in 6-connectivity
    labels[0, 4:6, 6:8] = 1  # 4 voxels: a tie with the first, kept too

    kept = remove_all_but_largest_regions(labels, [(1,)], volume_per_voxel=1.225)
    sized = remove_all_but_largest_regions(labels, [(1,)], 1.0, min_valid_object_sizes=[((1,), 0.5)])

    assert int(kept.sum()) == 8 and kept[0, 2, 2] == 0
    assert np.array_equal(sized, labels)  # only components smaller than 0.5 mm^3 would go


def test_v1_postprocessing_settings_survive_plans_json() -> None:
    v1_json = {"for_which_classes": [[1], 2], "min_valid_object_sizes": "{(1,): 350.0, 2: 10.0}"}

    settings = V1Inference.from_v1_postprocessing(v1_json)
    restored = V1Inference.from_plans({V1_PLANS_KEY: json.loads(json.dumps(settings.to_json()))})

    assert settings.postprocessing_classes == ((1,), 2)
    assert restored == settings
    assert V1Inference.from_plans({}) is None
    assert V1Inference.from_v1_postprocessing(None) == V1Inference()


def test_models_imported_by_liverfat_0_1_still_locate_their_network() -> None:
    """0.1.0 wrote the network's old dotted name into plans.json; nnunetv2 finds it with pydoc.locate."""
    import pydoc

    from liverfat.inference.models.nnunet_v1_network import V1CompatibleUNet

    assert pydoc.locate("liverfat.inference.nnunet_v1_network.V1CompatibleUNet") is V1CompatibleUNet
