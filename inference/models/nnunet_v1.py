"""Import a published nnU-Net v1 liver model (the seed's) into liverfat's model store as an nnU-Net v2 folder.

The seed method segments the liver with an nnU-Net **v1** model (nnunet 1.7.1, Task521_liver,
``3d_fullres``, ``nnUNetTrainerV2__nnUNetPlansv2.1``, fold 1). Its authors publish the trained
model folder as a zip; :func:`import_nnunet_v1` reads that zip (or the unpacked folder),
checks that it is that kind of model (task, fold, files, a one-class CT ``3d_fullres`` model
preprocessed as v1's ``GenericPreprocessor`` does), and writes an nnU-Net v2 trained-model
folder into the model store (``~/.cache/liverfat/models/nnunet/<name>/``), where
``--model <name>`` finds it: ``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth``
(:mod:`liverfat.inference.models.nnunet_v1_convert`), and ``liverfat_provenance.json``: where it came
from (SHA-256 of the source and of each file read, the v1 plans' identity, liverfat's version).
The backend then runs it with v1's inference (:mod:`liverfat.inference.models.nnunet_v1_predictor`)
and the seed's post-processing.

Nothing in the source is executed. v1 stores pickles: ``model_final_checkpoint.model.pkl`` and
``plans.pkl`` are read with :class:`RestrictedUnpickler` (numpy arrays and scalars, ``OrderedDict``,
nothing else), the weights with ``torch.load(weights_only=True)`` allowing only numpy scalars and
dtypes. The folder appears in the store in one rename, complete or not at all.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from liverfat import __version__
from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.nnunet import read_json_object
from liverfat.inference.models.nnunet_v1_convert import V1_CONFIGURATION, V1Model, write_v2_folder
from liverfat.inference.models.nnunet_v1_predictor import V1Inference
from liverfat.inference.models.store import default_model_store

logger = logging.getLogger(__name__)

SEED_TASK = "Task521_liver"
SEED_FOLD = 1
DEFAULT_MODEL_NAME = "seed-task521"
"""The store name of the seed's model unless ``name`` is given."""

V1_CONFIGURATIONS = ("2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres")
V1_TRAINER = "nnUNetTrainerV2"
V1_PREPROCESSOR = "GenericPreprocessor"
V1_PLANS_FILE = "plans.pkl"
V1_POSTPROCESSING_FILE = "postprocessing.json"
V1_CHECKPOINT_FILE = "model_final_checkpoint.model"
V1_CHECKPOINT_INFO_FILE = "model_final_checkpoint.model.pkl"
V1_PLANS_KEYS = ("base_num_features", "transpose_forward", "transpose_backward", "num_classes", "num_modalities")
V1_STAGE_KEYS = (
    "patch_size", "current_spacing", "pool_op_kernel_sizes", "conv_kernel_sizes", "batch_size",
    "median_patient_size_in_voxels",
)  # fmt: skip
V1_INTENSITY_KEYS = ("mean", "sd", "median", "mn", "mx", "percentile_00_5", "percentile_99_5")
"""What the conversion reads from v1's plans, its stage, and its CT intensity statistics."""
V1_INIT_STAGE = 5
"""Index of ``stage`` in v1's trainer ``init_args`` (plans_file, fold, output_folder, dataset_directory, batch_dice, stage, ...)."""
V1_INIT_PATHS = (2, 0, 3)
"""``init_args`` entries that are paths on the training machine: output folder, plans file, dataset folder."""

PROVENANCE_FILE = "liverfat_provenance.json"
PROVENANCE_FORMAT = 1
TASK_PATTERN = re.compile(r"^Task(\d{3})_\w+$")
HASH_CHUNK_BYTES = 1 << 20

# --- loading v1's pickles safely ----------------------------------------------------------------

_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") is not None else "numpy.core"
_ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        (f"{_NUMPY_CORE}.multiarray", "_reconstruct"),
        (f"{_NUMPY_CORE}.multiarray", "scalar"),
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only what v1 writes into its ``.pkl`` files: containers, numpy arrays and scalars.

    ``numpy.core`` (numpy 1.x, what the seed's files name) is read as ``numpy._core``. Any other
    global (a class, a function such as ``os.system``) raises ``pickle.UnpicklingError``.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy.core" or module.startswith("numpy.core."):
            module = _NUMPY_CORE + module.removeprefix("numpy.core")
        if (module, name) in _ALLOWED_PICKLE_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in an nnU-Net v1 pickle")


def load_v1_pickle(path: Path) -> Any:
    """The content of a v1 ``.pkl`` file, read with :class:`RestrictedUnpickler`."""
    try:
        with path.open("rb") as stream:
            return RestrictedUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as error:
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED, f"{path.name} is not a v1 pickle liverfat reads safely: {error}"
        ) from error


def _checkpoint_safe_globals() -> list[Any]:
    """The numpy globals a v1 checkpoint holds (loss curves and best values are numpy scalars)."""
    scalar = importlib.import_module(f"{_NUMPY_CORE}.multiarray").scalar
    dtype_classes = [type(np.dtype(code)) for code in ("f8", "f4", "i8", "i4", "b1")]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtype_classes,
    ]


def load_v1_checkpoint(path: Path) -> Mapping[str, Any]:
    """A v1 ``.model`` checkpoint, with ``torch.load(weights_only=True)`` and only numpy scalars allowed."""
    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED, f"{path.name} cannot be loaded safely as weights: {first_line}"
        ) from error
    if not isinstance(content, Mapping) or not isinstance(content.get("state_dict"), Mapping):
        raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"{path.name} has no 'state_dict': not a v1 checkpoint")
    return content


# --- finding the model in a zip or folder -------------------------------------------------------


@dataclass(frozen=True)
class _Listing:
    """A source (folder or zip) and the relative paths of its regular files."""

    source: Path
    files: frozenset[PurePosixPath]

    @property
    def is_zip(self) -> bool:
        return self.source.is_file()


def _list_source(source: Path) -> _Listing:
    if source.is_dir():
        files = frozenset(PurePosixPath(p.relative_to(source).as_posix()) for p in source.rglob("*") if p.is_file())
        return _Listing(source, files)
    if not zipfile.is_zipfile(source):
        problem = "does not exist" if not source.exists() else "is neither a folder nor a zip file"
        raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"{source} {problem}, expected the v1 model folder or its zip")
    with zipfile.ZipFile(source) as archive:
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
    return _Listing(source, frozenset(PurePosixPath(name) for name in names))


def _trainer_folder(listing: _Listing, task: str | None) -> PurePosixPath:
    """The v1 trained-model folder (``.../3d_fullres/TaskNNN_x/nnUNetTrainerV2__nnUNetPlansv2.1``) in the source."""
    candidates = {f.parent for f in listing.files if f.name == V1_PLANS_FILE}
    candidates |= {
        f.parent.parent
        for f in listing.files
        if f.name in (V1_CHECKPOINT_FILE, V1_CHECKPOINT_INFO_FILE) and f.parent.name.startswith("fold_")
    }
    if not candidates:
        if any(f.name == "plans.json" for f in listing.files):
            raise LiverfatError(
                Reason.MODEL_IMPORT_FAILED,
                f"{listing.source} holds an nnU-Net v2 model (plans.json), not a v1 one: "
                f"use its folder directly with --model PATH",
            )
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED,
            f"{listing.source} is not an nnU-Net v1 model: no {V1_PLANS_FILE} and no fold_N/{V1_CHECKPOINT_FILE} "
            f"found, expected nnUNet/{V1_CONFIGURATION}/{SEED_TASK}/{V1_TRAINER}__nnUNetPlansv2.1/ with them",
        )
    preferences: list[Callable[[PurePosixPath], bool]] = [
        lambda folder: V1_CONFIGURATION in folder.parts,
        lambda folder: folder.name.startswith(f"{V1_TRAINER}__"),
        lambda folder: task is not None and _task_id(_task_in(folder.parts)) == _task_id(task),
    ]
    chosen = sorted(candidates)
    for prefer in preferences:
        chosen = [folder for folder in chosen if prefer(folder)] or chosen
    if len(chosen) > 1:
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED,
            f"{listing.source} holds several nnU-Net v1 models ({', '.join(map(str, chosen))}); "
            f"give the folder of the one to import",
        )
    return chosen[0]


def _check_files(listing: _Listing, folder: PurePosixPath, fold: int) -> dict[str, PurePosixPath]:
    """The files the import reads, by role; a clear error for each one missing."""
    where = f"{listing.source}" + ("" if folder == PurePosixPath(".") else f" ({folder})")
    if folder / V1_PLANS_FILE not in listing.files:
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED,
            f"{V1_PLANS_FILE} is missing in {where}: nnU-Net v1 needs it beside the fold folders",
        )
    fold_folder = folder / f"fold_{fold}"
    if not any(f.parent == fold_folder for f in listing.files):
        present = sorted(
            {f.parent.name for f in listing.files if f.parent.parent == folder and f.parent.name.startswith("fold_")}
        )
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED,
            f"fold_{fold} is missing in {where} (folds present: {', '.join(present) or 'none'}); "
            f"the seed's model is fold {SEED_FOLD}",
        )
    files = {"plans": folder / V1_PLANS_FILE}
    for role, name in (("checkpoint", V1_CHECKPOINT_FILE), ("checkpoint_info", V1_CHECKPOINT_INFO_FILE)):
        if fold_folder / name not in listing.files:
            raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"{fold_folder / name} is missing in {listing.source}")
        files[role] = fold_folder / name
    if folder / V1_POSTPROCESSING_FILE in listing.files:
        files["postprocessing"] = folder / V1_POSTPROCESSING_FILE
    return files


def _materialise(listing: _Listing, files: Mapping[str, PurePosixPath], staging: Path) -> dict[str, Path]:
    """Paths on disk of the files to read: in the folder itself, or extracted from the zip into ``staging``."""
    if not listing.is_zip:
        return {role: listing.source.joinpath(*relative.parts) for role, relative in files.items()}
    paths = {}
    with zipfile.ZipFile(listing.source) as archive:
        for role, relative in files.items():
            target = staging / "source" / role  # named by role: member paths never choose where files land
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(str(relative)) as member, target.open("wb") as out:
                shutil.copyfileobj(member, out, HASH_CHUNK_BYTES)
            paths[role] = target
    return paths


# --- what the v1 model is ------------------------------------------------------------------------


def _task_in(parts: Sequence[str]) -> str | None:
    return next((part for part in parts if TASK_PATTERN.match(part)), None)


def _task_id(task: str | None) -> int | None:
    match = TASK_PATTERN.match(task or "")
    return int(match.group(1)) if match else None


def _init_parts(init: Sequence[Any]) -> list[str]:
    """Path components of the training machine's paths in v1's ``init_args`` (output folder first)."""
    parts: list[str] = []
    for index in V1_INIT_PATHS:
        if index < len(init) and isinstance(init[index], str):
            parts += re.split(r"[\\/]", init[index])
    return parts


def _read_model(paths: Mapping[str, Path], folder: PurePosixPath, fold: int, task: str | None) -> V1Model:
    info = load_v1_pickle(paths["checkpoint_info"])
    if not isinstance(info, Mapping) or not {"init", "name", "plans"} <= set(info):
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED, f"{V1_CHECKPOINT_INFO_FILE} lacks 'init', 'name' or 'plans': not from nnU-Net v1"
        )
    if info["name"] != V1_TRAINER:
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED, f"the model was trained with {info['name']}, liverfat imports {V1_TRAINER} models"
        )
    folder_plans = load_v1_pickle(paths["plans"])
    if not isinstance(folder_plans, Mapping) or "num_modalities" not in folder_plans:
        raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"{V1_PLANS_FILE} is not an nnU-Net v1 plans file")
    init = tuple(info["init"]) if isinstance(info["init"], (list, tuple)) else ()
    parts = [*_init_parts(init), *folder.parts]
    found_task = _task_in(parts)
    if task is not None and _task_id(found_task) != _task_id(task):
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED,
            f"the model was trained for {found_task or 'an unnamed task'}, expected {task} (the seed's liver model)",
        )
    configuration = next((part for part in parts if part in V1_CONFIGURATIONS), V1_CONFIGURATION)
    if configuration != V1_CONFIGURATION:
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED,
            f"the model is a {configuration} model, liverfat imports {V1_CONFIGURATION} models (the seed's)",
        )
    plans = info["plans"]
    stage = _stage(plans, init[V1_INIT_STAGE] if len(init) > V1_INIT_STAGE else None)
    trainer_folder = next((part for part in reversed(parts) if part.startswith(f"{V1_TRAINER}__")), "")
    checkpoint = load_v1_checkpoint(paths["checkpoint"])
    postprocessing = read_json_object(paths["postprocessing"], Reason.MODEL_IMPORT_FAILED) if "postprocessing" in paths else None
    try:
        inference = V1Inference.from_v1_postprocessing(postprocessing)
    except (ValueError, TypeError, SyntaxError) as error:
        raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"{V1_POSTPROCESSING_FILE} is not v1's: {error}") from error
    model = V1Model(
        task=found_task or folder.name,
        configuration=configuration,
        plans_identifier=trainer_folder.partition("__")[2] or str(plans.get("data_identifier", "")),
        fold=fold,
        stage=stage,
        plans=plans,
        batch_dice=bool(init[4]) if len(init) > 4 else True,
        # weights saved from a DataParallel network are named module.*; v1 strips that prefix too
        state_dict={key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()},
        epoch=int(checkpoint.get("epoch", 0)),
        inference=inference,
    )
    _check_plans(model)
    return model


def _stage(plans: Any, stage: Any) -> int:
    stages = plans.get("plans_per_stage") if isinstance(plans, Mapping) else None
    if not isinstance(stages, Mapping) or not stages:
        raise LiverfatError(Reason.MODEL_IMPORT_FAILED, "the v1 plans have no 'plans_per_stage'")
    if stage is None:
        if len(stages) != 1:
            raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"the v1 plans have {len(stages)} stages and no stage chosen")
        stage = next(iter(stages))
    if stage not in stages:
        raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"stage {stage} is not in the v1 plans (stages {list(stages)})")
    return int(stage)


def _check_plans(model: V1Model) -> None:
    """Refuse what liverfat does not run exactly as v1: not 3-D, not one CT channel, not one class, other preprocessing."""
    plans, stage = model.plans, model.stage_plans
    properties = plans.get("dataset_properties", {})
    intensity = properties.get("intensityproperties", {}).get(0, {})
    missing = [
        *(f"'{key}'" for key in V1_PLANS_KEYS if key not in plans),
        *(f"stage '{key}'" for key in V1_STAGE_KEYS if key not in stage),
        *(f"intensity '{key}'" for key in V1_INTENSITY_KEYS if key not in intensity),
    ]
    if missing:
        raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"the v1 plans lack {', '.join(missing)}")
    modalities = dict(plans.get("modalities") or properties.get("modalities", {}))
    problems = []
    if len(stage.get("patch_size", ())) != 3:
        problems.append(f"patch size {list(stage.get('patch_size', ()))} is not 3-D")
    if plans.get("num_modalities") != 1 or modalities.get(0) != "CT":
        problems.append(f"inputs {modalities} are not one CT channel")
    if dict(plans.get("normalization_schemes", {})).get(0) != "CT":
        problems.append(f"normalisation {dict(plans.get('normalization_schemes', {}))} is not v1's 'CT' scheme")
    if dict(plans.get("use_mask_for_norm", {})).get(0):
        problems.append("normalisation uses the non-zero mask")
    if plans.get("num_classes") != 1:
        problems.append(f"{plans.get('num_classes')} foreground classes (expected 1, the liver)")
    if plans.get("preprocessor_name", V1_PREPROCESSOR) != V1_PREPROCESSOR:
        problems.append(f"preprocessor {plans.get('preprocessor_name')} (expected {V1_PREPROCESSOR})")
    if int(plans.get("conv_per_stage", 2)) < 2:
        problems.append(f"conv_per_stage {plans.get('conv_per_stage')} (expected at least 2)")
    if problems:
        raise LiverfatError(
            Reason.MODEL_IMPORT_FAILED,
            f"{model.task} is not a liver model liverfat can run as v1 does: {'; '.join(problems)}",
        )


# --- provenance and the store --------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _source_identity(
    listing: _Listing, files: Mapping[str, PurePosixPath], paths: Mapping[str, Path]
) -> dict[str, Any]:
    """Where the model comes from: the zip's SHA-256, or for a folder the SHA-256 of its manifest of files read."""
    file_hashes = {str(files[role]): file_sha256(path) for role, path in paths.items()}
    if listing.is_zip:
        source_sha256 = file_sha256(listing.source)
    else:  # sha256sum's manifest format, sorted by name
        manifest = "".join(f"{digest}  {name}\n" for name, digest in sorted(file_hashes.items()))
        source_sha256 = hashlib.sha256(manifest.encode("utf-8")).hexdigest()
    return {
        "path": str(listing.source),
        "kind": "zip" if listing.is_zip else "folder",
        "sha256": source_sha256,
        "files_sha256": file_hashes,
    }


def _provenance(source: Mapping[str, Any], files: Mapping[str, PurePosixPath], model: V1Model) -> dict[str, Any]:
    return {
        "format": PROVENANCE_FORMAT,
        "imported_by": f"liverfat {__version__}",
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": dict(source),
        "nnunet_v1": {
            "task": model.task,
            "configuration": model.configuration,
            "trainer": V1_TRAINER,
            "plans_identifier": model.plans_identifier,
            "data_identifier": str(model.plans.get("data_identifier", "")),
            "stage": model.stage,
            "fold": model.fold,
            "checkpoint": V1_CHECKPOINT_FILE,
            "epoch": model.epoch,
            "plans_sha256": source["files_sha256"][str(files["plans"])],
            "postprocessing": model.inference.to_json(),
        },
    }


def _imported_sha256(folder: Path) -> str | None:
    """The source checksum recorded in a store folder, if liverfat imported it."""
    provenance = folder / PROVENANCE_FILE
    return str(read_json_object(provenance, Reason.MODEL_IMPORT_FAILED).get("source", {}).get("sha256")) if provenance.is_file() else None


def import_nnunet_v1(
    source: Path,
    *,
    name: str | None = None,
    store: Path | None = None,
    fold: int = SEED_FOLD,
    task: str | None = SEED_TASK,
) -> Path:
    """Convert an nnU-Net v1 model (folder or zip) into ``<store>/<name>/`` and return that folder.

    Parameters
    ----------
    source
        The zip the seed's authors publish (``nnUNet_trained_models.zip``), or any folder that
        holds the v1 trained-model folder (``RESULTS_FOLDER``, ``nnUNet/3d_fullres/...``, or the
        ``nnUNetTrainerV2__nnUNetPlansv2.1`` folder itself).
    name
        The model's name in the store (default :data:`DEFAULT_MODEL_NAME`); ``--model NAME`` selects it.
    store
        The model store; default ``~/.cache/liverfat/models/nnunet``.
    fold, task
        The fold to import and the task the model must have been trained for (``None``: any
        one-class CT liver task); the seed's are fold 1 of Task521_liver.

    Importing the same source again under the same name returns the existing folder; another
    source under a name already taken is refused.
    """
    source = Path(source).expanduser().resolve()
    name = name or DEFAULT_MODEL_NAME
    if not name or name.startswith(".") or Path(name).name != name:
        raise LiverfatError(Reason.MODEL_IMPORT_FAILED, f"model name {name!r} must be a plain folder name")
    root = (default_model_store() if store is None else Path(store)).expanduser()
    listing = _list_source(source)
    folder = _trainer_folder(listing, task)
    files = _check_files(listing, folder, fold)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.importing-", dir=root))
    try:
        paths = _materialise(listing, files, staging)
        identity = _source_identity(listing, files, paths)
        target = root / name
        if target.exists():
            if _imported_sha256(target) == identity["sha256"]:
                logger.info("model %s in %s already holds %s", name, root, source)
                return target
            raise LiverfatError(
                Reason.MODEL_IMPORT_FAILED,
                f"the model store already has a model named {name!r} ({target}) from another source; "
                f"choose another name or delete that folder",
            )
        model = _read_model(paths, folder, fold, task)
        out = staging / "model"
        write_v2_folder(model, out)
        provenance = _provenance(identity, files, model)
        (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        os.rename(out, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("imported %s (%s fold %d) into %s", source, model.task, fold, target)
    return target


def import_command(source: Path, name: str | None = None, store: Path | None = None) -> str:
    """``liverfat models import-nnunet-v1``: import, then the text that says where it went and how to use it."""
    target = import_nnunet_v1(source, name=name, store=store)
    provenance = read_json_object(target / PROVENANCE_FILE, Reason.MODEL_IMPORT_FAILED)
    v1 = provenance["nnunet_v1"]
    return "\n".join(
        [
            f"nnU-Net v1 model {v1['task']} ({v1['configuration']}, fold {v1['fold']}) "
            f"from {provenance['source']['path']} (sha256 {provenance['source']['sha256']})",
            f"is in the model store as {target}.",
            f"Select it with:  liverfat analyze ... --model {target.name}",
            f'or in the node configuration:  [model] name = "{target.name}"',
        ]
    )
