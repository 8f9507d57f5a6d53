"""The ``nnunetv2`` backend: any nnU-Net v2 trained-model folder as a liver segmenter.

A trained-model folder is what ``nnUNetv2_train`` leaves in ``nnUNet_results``
(``<Trainer>__<Plans>__<configuration>/``): ``dataset.json``, ``plans.json`` and
``fold_N/checkpoint_final.pth`` (or ``checkpoint_best.pth``). Multi-label models such as
TotalSegmentator's work too: the liver is the label named ``liver`` (any case) in
``dataset.json``.

Prediction runs in memory through nnU-Net's own ``nnUNetPredictor``
(``initialize_from_trained_model_folder`` + ``predict_single_npy_array``), so nnU-Net does its
own preprocessing (normalisation, resampling to the model's spacing, sliding window, fold
ensembling, test-time mirroring) exactly as in ``nnUNetv2_predict``. No ``nnUNet_*``
environment variable is needed or set.

Axis order
----------
nnU-Net sees an image the way the reader named in ``plans.json`` (``image_reader_writer``)
returns it: an array ``[c, z, y, x]`` and ``{'spacing': [sz, sy, sx]}`` in the same order.

- ``SimpleITKIO`` (the default) and ``NibabelIO`` hand over the voxels in file storage order,
  as ``sitk.GetArrayFromImage`` indexes them: ``[k, j, i]`` with spacing reversed to
  ``(sk, sj, si)``. A NIfTI that SimpleITK writes from an identity-direction LPS image reads
  back as exactly the array of our :class:`Volume` (the seed's working-grid NIfTIs are such
  files: SimpleITK reads them with the identity direction, nibabel reports axis codes
  L, P, S). So for these readers the working-grid ``Volume.array`` is passed unchanged
  (orientation ``LPS``).
- ``NibabelIOWithReorient`` and ``SimpleITKIOWithReorient`` first reorient every image to
  RAS (i pointing to the patient's right, j anterior, k superior); from the LPS working
  grid that is a flip of the i and j axes (orientation ``RAS``).

With the storage-order readers nothing in a model folder records how the training files were
stored. A model trained on RAS-stored files must be run with ``orientation="RAS"``: for
example TotalSegmentator's own pipeline reorients every input to RAS with nibabel before
calling nnU-Net, whatever the reader in its plans. ``orientation="auto"`` follows the reader.

:func:`nnunet_input` is the one place that does this conversion; :func:`mask_from_nnunet`
undoes it (flips are their own inverse). Both are tested against nnU-Net's readers on a NIfTI
written by SimpleITK.

Process-wide state
------------------
nnU-Net's predictor sets ``torch.backends.cudnn.benchmark = True`` when built for CUDA; this
module restores the previous value right after. Around each prediction nnU-Net lowers
``torch.set_num_threads`` to at most 8 and restores it itself. What the predictor's constructor
prints (a notice on every CPU device) is captured and logged at debug level, so that stdout stays
clean for the CLI's output. Checkpoints are unpickled by
nnU-Net with ``torch.load(..., weights_only=False)``: load only model folders you trust.

Converted nnU-Net v1 models
---------------------------
A folder written by :func:`liverfat.inference.models.nnunet_v1.import_nnunet_v1` carries a
``liverfat_nnunet_v1`` entry in ``plans.json``. Such a model runs through
:class:`~liverfat.inference.models.nnunet_v1_predictor.V1Predictor` (v1's preprocessing order, softmax
averaging and float32 accumulation, and the v1 folder's ``postprocessing.json``), and its liver
mask then goes through the seed's own largest-component step. Every other model runs through
nnunetv2's own ``nnUNetPredictor``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.devices import device_label, resolve_device
from liverfat.inference.models.nnunet_options import (
    NNUNET_CHECKPOINT_FINAL,
    NNUNET_DEFAULT_TILE_STEP_SIZE,
    NNUNET_ORIENTATIONS,
    ORIENTATION_AUTO,
    ORIENTATION_LPS,
    ORIENTATION_RAS,
)
from liverfat.inference.models.nnunet_v1_predictor import V1Inference, V1Predictor, seed_largest_component
from liverfat.result import ModelInfo
from liverfat.volume import Volume

logger = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
PLANS_JSON = "plans.json"
MODEL_FILES = (DATASET_JSON, PLANS_JSON)
LIVER_LABEL_NAME = "liver"
FOLD_ALL = "all"
FOLD_PREFIX = "fold_"
REORIENTING_READERS = frozenset({"NibabelIOWithReorient", "SimpleITKIOWithReorient"})
"""nnU-Net readers that turn every image to RAS before the network sees it."""
FLIPS_FROM_LPS: dict[str, tuple[int, ...]] = {ORIENTATION_LPS: (), ORIENTATION_RAS: (1, 2)}
"""Array axes ([k, j, i]) to flip from an identity-direction LPS grid: for RAS, j (P->A) and i (L->R)."""
HASH_CHUNK_BYTES = 1 << 20

Fold = int | str


@dataclass(frozen=True)
class ModelFolder:
    """An nnU-Net v2 trained-model folder, checked: files present, liver label found, folds chosen."""

    path: Path
    dataset_name: str
    plans_name: str
    reader_writer: str
    orientation: str
    liver_label: str
    liver_values: tuple[int, ...]
    folds: tuple[Fold, ...]
    checkpoint_name: str
    trainer_name: str
    configuration: str
    v1_inference: V1Inference | None = None
    """How a converted nnU-Net v1 model runs; ``None`` for every other model."""

    @property
    def checkpoints(self) -> tuple[Path, ...]:
        return tuple(self.path / f"{FOLD_PREFIX}{fold}" / self.checkpoint_name for fold in self.folds)

    @property
    def version(self) -> str:
        """nnunetv2's version, how the model was trained, and which checkpoints run."""
        folds = ",".join(str(fold) for fold in self.folds)
        return (
            f"nnunetv2 {importlib.metadata.version('nnunetv2')}; "
            f"{self.trainer_name}__{self.plans_name}__{self.configuration}; folds {folds}; {self.checkpoint_name}; "
            f"input {self.orientation}"
            + ("; nnU-Net v1 inference" if self.v1_inference is not None else "")
        )

    def model_info(self, device: str | None = None) -> ModelInfo:
        return ModelInfo(
            name=f"{self.path.name} ({self.dataset_name})",
            version=self.version,
            checksum=checkpoints_sha256(self.checkpoints),
            device=device,
        )


def network_orientation(reader_writer: str, requested: str = ORIENTATION_AUTO) -> str:
    """``LPS`` or ``RAS``: the voxel order the model was trained on (``auto``: from its reader)."""
    if requested == ORIENTATION_AUTO:
        return ORIENTATION_RAS if reader_writer in REORIENTING_READERS else ORIENTATION_LPS
    if requested not in FLIPS_FROM_LPS:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"unknown nnU-Net input orientation {requested!r}, expected one of {', '.join(NNUNET_ORIENTATIONS)}",
        )
    return requested


def nnunet_input(ct: Volume, orientation: str) -> tuple[np.ndarray, dict[str, list[float]]]:
    """The array ``[1, z, y, x]`` and properties nnU-Net's reader would give for ``ct``.

    ``ct`` must lie on an identity-direction LPS grid (the working grid); ``orientation`` is
    ``LPS`` (array unchanged, as SimpleITKIO reads it) or ``RAS`` (i and j flipped, as the
    reorienting readers give it). The spacing is reversed to the array's axis order.
    """
    if not np.allclose(ct.direction, np.eye(3), atol=1e-6):
        raise ValueError(
            "the nnU-Net backend expects the identity-direction LPS working grid, "
            f"got direction {ct.direction.tolist()}"
        )
    array = np.flip(ct.array, FLIPS_FROM_LPS[orientation])
    spacing_kji = [float(s) for s in reversed(ct.spacing)]
    return np.ascontiguousarray(array[None], dtype=np.float32), {"spacing": spacing_kji}


def mask_from_nnunet(segmentation: np.ndarray, orientation: str) -> np.ndarray:
    """Undo :func:`nnunet_input`'s axis flips on a ``[z, y, x]`` segmentation: back to ``[k, j, i]``."""
    return np.ascontiguousarray(np.flip(segmentation, FLIPS_FROM_LPS[orientation]))


def find_liver_label(
    labels: Mapping[str, Any], regions_class_order: Sequence[int] | None = None
) -> tuple[str, tuple[int, ...]]:
    """The liver label's name in ``dataset.json`` ``labels`` and the segmentation values that mean liver.

    The name must be ``liver`` in any case, exactly once. For region-based models (label values
    that are lists) nnU-Net writes ``regions_class_order[r]`` for the last region ``r`` found
    positive, so the liver is every value whose region lies inside the liver region.
    """
    names = [name for name in labels if name.strip().lower() == LIVER_LABEL_NAME]
    if len(names) != 1:
        found = "none" if not names else ", ".join(repr(n) for n in names)
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"expected exactly one label named {LIVER_LABEL_NAME!r} (any case) in {DATASET_JSON} 'labels', "
            f"found {found} among {', '.join(repr(n) for n in labels)}",
        )
    name = names[0]
    value = labels[name]
    if not isinstance(value, (list, tuple)):
        return name, (int(value),)
    if len(value) == 1:
        return name, (int(value[0]),)
    if regions_class_order is None:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"label {name!r} is a region {list(value)} but {DATASET_JSON} has no 'regions_class_order'",
        )
    liver_region = _label_set(value)
    regions = [_label_set(r) for key, r in labels.items() if key != "ignore" and _label_set(r) != {0}]
    values = tuple(int(c) for region, c in zip(regions, regions_class_order) if region <= liver_region)
    return name, values


def _label_set(value: Any) -> frozenset[int]:
    """The label values of a dataset.json label entry (an int or a region list)."""
    return frozenset(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def inspect_model_folder(
    path: Path | str,
    *,
    folds: Sequence[Fold] | None = None,
    checkpoint_name: str = NNUNET_CHECKPOINT_FINAL,
    orientation: str = ORIENTATION_AUTO,
) -> ModelFolder:
    """Check an nnU-Net v2 trained-model folder and choose its folds, without building the network.

    ``path`` may also be the dataset folder above a single ``<Trainer>__<Plans>__<configuration>``
    folder. ``folds=None`` takes every ``fold_N`` holding ``checkpoint_name`` (or ``fold_all``
    when it is the only one). ``orientation`` is the voxel order the model was trained on
    (``auto``, ``LPS`` or ``RAS``; see the module docstring).
    """
    folder = _trained_model_folder(Path(path).expanduser())
    dataset_json = read_json_object(folder / DATASET_JSON)
    plans = read_json_object(folder / PLANS_JSON)
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    if len(channels) != 1:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"model {folder} expects {len(channels)} input channels ({channels}), liverfat gives one CT channel",
        )
    liver_label, liver_values = find_liver_label(
        dataset_json.get("labels", {}), dataset_json.get("regions_class_order")
    )
    chosen = _choose_folds(folder, folds, checkpoint_name)
    reader_writer = str(plans.get("image_reader_writer", "SimpleITKIO"))
    trainer_name, configuration = _checkpoint_header(folder / f"{FOLD_PREFIX}{chosen[0]}" / checkpoint_name)
    if PlansManager(plans).get_configuration(configuration).previous_stage_name is not None:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"model {folder} is the second stage of a cascade (configuration {configuration!r}), "
            f"which needs the first stage's output; use a 3d_fullres or 2d model folder",
        )
    try:
        v1_inference = V1Inference.from_plans(plans)
    except (ValueError, TypeError) as error:
        raise LiverfatError(Reason.BACKEND_UNAVAILABLE, f"model {folder}: {PLANS_JSON} {error}") from error
    return ModelFolder(
        path=folder,
        dataset_name=str(plans.get("dataset_name", dataset_json.get("name", folder.parent.name))),
        plans_name=str(plans.get("plans_name", "")),
        reader_writer=reader_writer,
        orientation=network_orientation(reader_writer, orientation),
        liver_label=liver_label,
        liver_values=liver_values,
        folds=chosen,
        checkpoint_name=checkpoint_name,
        trainer_name=trainer_name,
        configuration=configuration,
        v1_inference=v1_inference,
    )


def checkpoints_sha256(paths: Sequence[Path]) -> str:
    """One SHA-256 over the checkpoint files' bytes, in fold order, as ``sha256:<hex>``."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as stream:
            while chunk := stream.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class NnUNetBackend:
    """A liver segmenter from an nnU-Net v2 trained-model folder (implements ``Backend``).

    Parameters
    ----------
    model_dir
        The trained-model folder (or the dataset folder above a single one).
    device
        ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    folds
        Folds to ensemble; default every fold present.
    use_mirroring
        nnU-Net's test-time augmentation by mirroring along the axes the model allows
        (up to 8 network passes per tile); off is faster and slightly less accurate.
    tile_step_size
        Sliding-window step as a fraction of the tile (nnU-Net's default 0.5; larger is faster).
    checkpoint_name
        ``checkpoint_final.pth`` (default) or ``checkpoint_best.pth``.
    orientation
        Voxel order the model was trained on: ``auto`` (from the reader in ``plans.json``),
        ``LPS`` or ``RAS`` (TotalSegmentator's models); see the module docstring.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        device: str = "auto",
        folds: Sequence[Fold] | None = None,
        use_mirroring: bool = True,
        tile_step_size: float = NNUNET_DEFAULT_TILE_STEP_SIZE,
        checkpoint_name: str = NNUNET_CHECKPOINT_FINAL,
        orientation: str = ORIENTATION_AUTO,
    ) -> None:
        if not 0.0 < tile_step_size <= 1.0:
            raise ValueError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
        self._folder = inspect_model_folder(
            model_dir, folds=folds, checkpoint_name=checkpoint_name, orientation=orientation
        )
        torch_device = resolve_device(device)
        self._predictor = _build_predictor(
            torch_device,
            use_mirroring=use_mirroring,
            tile_step_size=tile_step_size,
            v1_inference=self._folder.v1_inference,
        )
        self._predictor.initialize_from_trained_model_folder(
            str(self._folder.path), use_folds=self._folder.folds, checkpoint_name=checkpoint_name
        )
        self._info = self._folder.model_info(device=device_label(torch_device))
        logger.info("loaded nnU-Net model %s (%s) on %s", self._info.name, self._info.version, torch_device)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def folder(self) -> ModelFolder:
        """The checked model folder: labels, folds and reader in use."""
        return self._folder

    @property
    def predictor(self) -> nnUNetPredictor:
        """The initialised nnU-Net predictor, for inspection (its settings are the ones passed in)."""
        return self._predictor

    def predict(self, ct: Volume) -> Volume:
        """Boolean liver mask on ``ct``'s grid (the identity-direction LPS working grid)."""
        image, properties = nnunet_input(ct, self._folder.orientation)
        segmentation = self._predictor.predict_single_npy_array(image, properties)
        liver = np.isin(np.asarray(segmentation), self._folder.liver_values)
        v1_inference = self._folder.v1_inference
        if v1_inference is not None and v1_inference.seed_largest_component:
            liver = seed_largest_component(liver)
        return ct.with_array(mask_from_nnunet(liver, self._folder.orientation))


def _build_predictor(
    device: torch.device, *, use_mirroring: bool, tile_step_size: float, v1_inference: V1Inference | None = None
) -> nnUNetPredictor:
    """nnU-Net's predictor with its settings, leaving torch's process-wide cudnn setting as it was.

    A converted nnU-Net v1 model (``v1_inference`` given) gets :class:`V1Predictor`, any other
    model nnunetv2's own ``nnUNetPredictor``.

    The constructor prints a notice on every CPU device; it is captured and logged at debug
    level so that nothing reaches stdout (where the CLI may be writing JSON).
    """
    cudnn_benchmark = torch.backends.cudnn.benchmark
    printed = io.StringIO()
    try:
        settings: dict[str, Any] = {
            "tile_step_size": tile_step_size,
            "use_gaussian": True,
            "use_mirroring": use_mirroring,
            "perform_everything_on_device": device.type == "cuda",
            "device": device,
            "verbose": False,
            "verbose_preprocessing": False,
            "allow_tqdm": False,
        }
        with contextlib.redirect_stdout(printed):
            if v1_inference is not None:
                return V1Predictor(v1_inference, **settings)
            return nnUNetPredictor(**settings)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if printed.getvalue().strip():
            logger.debug("nnU-Net printed: %s", printed.getvalue().strip())


def _trained_model_folder(path: Path) -> Path:
    """``path`` itself when it holds dataset.json and plans.json, else its only sub-folder that does."""
    if not path.is_dir():
        raise LiverfatError(Reason.BACKEND_UNAVAILABLE, f"nnU-Net model folder {path} does not exist")
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if not missing:
        return path
    candidates = sorted(sub for sub in path.iterdir() if all((sub / name).is_file() for name in MODEL_FILES))
    if len(candidates) == 1:
        logger.info("using the trained-model folder %s inside %s", candidates[0].name, path)
        return candidates[0]
    hint = (
        f"; it holds several trained-model folders, name one: {', '.join(c.name for c in candidates)}"
        if candidates
        else ""
    )
    raise LiverfatError(
        Reason.BACKEND_UNAVAILABLE,
        f"{path} is not an nnU-Net v2 trained-model folder: {', '.join(missing)} missing{hint}",
    )


def _choose_folds(folder: Path, folds: Sequence[Fold] | None, checkpoint_name: str) -> tuple[Fold, ...]:
    present = _folds_present(folder, checkpoint_name)
    if folds is None:
        numbered = tuple(fold for fold in present if fold != FOLD_ALL)
        chosen = numbered or present
    else:
        chosen = tuple(_parse_fold(fold) for fold in folds)
        absent = [fold for fold in chosen if fold not in present]
        if absent:
            raise LiverfatError(
                Reason.BACKEND_UNAVAILABLE,
                f"fold(s) {', '.join(map(str, absent))} requested but {folder} has no "
                f"{', '.join(f'{FOLD_PREFIX}{fold}/{checkpoint_name}' for fold in absent)} "
                f"(folds present: {', '.join(map(str, present)) or 'none'})",
            )
    if not chosen:
        others = sorted(str(p.relative_to(folder)) for p in folder.glob(f"{FOLD_PREFIX}*/*.pth"))
        found = f"; found {', '.join(others)}" if others else ""
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"{folder} has no {FOLD_PREFIX}N/{checkpoint_name}{found}",
        )
    return chosen


def _folds_present(folder: Path, checkpoint_name: str) -> tuple[Fold, ...]:
    """Numbered folds in ascending order, then ``all``: those whose folder holds the checkpoint."""
    names = {
        sub.name.removeprefix(FOLD_PREFIX)
        for sub in folder.glob(f"{FOLD_PREFIX}*")
        if (sub / checkpoint_name).is_file()
    }
    numbered: list[Fold] = sorted(int(name) for name in names if name.isdigit())
    return (*numbered, *([FOLD_ALL] if FOLD_ALL in names else []))


def _parse_fold(fold: Fold) -> Fold:
    text = str(fold).strip().lower()
    if text == FOLD_ALL:
        return FOLD_ALL
    if not text.isdigit():
        raise LiverfatError(Reason.BACKEND_UNAVAILABLE, f"fold {fold!r} is not a number or {FOLD_ALL!r}")
    return int(text)


def _checkpoint_header(checkpoint: Path) -> tuple[str, str]:
    """Trainer class name and configuration recorded in an nnU-Net checkpoint.

    nnU-Net itself loads checkpoints with ``weights_only=False`` (they hold plans and numpy
    values); ``mmap=True`` keeps this read from loading the weights.
    """
    try:
        content = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        return str(content["trainer_name"]), str(content["init_args"]["configuration"])
    except (KeyError, TypeError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"{checkpoint} is not an nnU-Net v2 checkpoint: expected keys 'trainer_name' and "
            f"'init_args' -> 'configuration' ({type(error).__name__}: {error})",
        ) from error


def read_json_object(path: Path, reason: Reason = Reason.BACKEND_UNAVAILABLE) -> dict[str, Any]:
    """A model folder's JSON file, which must hold an object; anything else is ``reason``."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LiverfatError(reason, f"cannot read {path}: {error}") from error
    if not isinstance(content, dict):
        raise LiverfatError(reason, f"{path} holds {type(content).__name__}, expected an object")
    return content
