"""Which segmentation model to run: the registry of model names and the factory that loads one.

This module is importable without torch or nnunetv2 (the CLI reads its choices from here);
the backends themselves are imported only when a model is actually loaded.

A model is named in one of three ways:

- ``"default"``: the built-in liver network (:mod:`liverfat.inference.default_backend`);
- a path to an nnU-Net v2 trained-model folder (``dataset.json``, ``plans.json``,
  ``fold_N/checkpoint_final.pth``), for example TotalSegmentator's;
- the name of a folder in liverfat's model store, ``<store>/<name>/``, by default the ``nnunet``
  folder of the model cache: ``$LIVERFAT_MODEL_CACHE/nnunet/<name>/`` or
  ``~/.cache/liverfat/models/nnunet/<name>/``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from liverfat.dicom_io.errors import LiverfatError, Reason
from liverfat.inference.weights import model_cache_dir

if TYPE_CHECKING:
    import torch

    from liverfat.inference.backend import Backend
    from liverfat.result import ModelInfo

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
"""The model name that selects the built-in network."""

BUILTIN_MODELS: dict[str, str] = {
    DEFAULT_MODEL: "built-in 3D U-Net whole-liver network (CPU or CUDA)",
}
"""Model names that are not paths or store entries, with a one-line description each."""

DEVICE_AUTO = "auto"
DEVICE_CHOICES: tuple[str, ...] = (DEVICE_AUTO, "cpu", "cuda")
"""Accepted ``device`` values; ``cuda:N`` selects one GPU among several."""

NNUNET_CHECKPOINT_FINAL = "checkpoint_final.pth"
NNUNET_CHECKPOINT_BEST = "checkpoint_best.pth"
NNUNET_CHECKPOINT_CHOICES: tuple[str, ...] = (NNUNET_CHECKPOINT_FINAL, NNUNET_CHECKPOINT_BEST)
NNUNET_DEFAULT_TILE_STEP_SIZE = 0.5
"""nnU-Net's own default: sliding-window tiles overlap by half a tile."""

ORIENTATION_AUTO = "auto"
ORIENTATION_LPS = "LPS"
ORIENTATION_RAS = "RAS"
NNUNET_ORIENTATIONS: tuple[str, ...] = (ORIENTATION_AUTO, ORIENTATION_LPS, ORIENTATION_RAS)
"""Voxel order an nnU-Net model was trained on; ``auto`` follows the reader in its plans."""

MODEL_STORE_FOLDER = "nnunet"
"""The model store's folder in the model cache, unless a store is given explicitly."""


def default_model_store() -> Path:
    """The folder that holds named nnU-Net models: ``nnunet`` in the model cache (see ``weights``)."""
    return model_cache_dir() / MODEL_STORE_FOLDER


def store_models(store: Path | None = None) -> list[str]:
    """Names of the model folders in the store: sub-folders with a ``dataset.json`` in them or one level down.

    Hidden folders (``.name``, such as an import still being written) are not models.
    """
    root = default_model_store() if store is None else store
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.is_dir()
        and not entry.name.startswith(".")
        and ((entry / "dataset.json").is_file() or any(entry.glob("*/dataset.json")))
    )


def resolve_device(device: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a ``torch.device`` that exists here.

    ``auto`` picks the first CUDA GPU when torch sees one and the CPU otherwise.
    """
    import torch

    name = device.strip().lower()
    if name == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LiverfatError(
                Reason.BACKEND_UNAVAILABLE,
                f"device {device!r} was requested but torch {torch.__version__} sees no CUDA GPU; "
                f"use device 'cpu' or 'auto'",
            )
        index_text = name.partition(":")[2]
        if index_text and (not index_text.isdigit() or int(index_text) >= torch.cuda.device_count()):
            raise LiverfatError(
                Reason.BACKEND_UNAVAILABLE,
                f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}",
            )
        return torch.device(name)
    raise LiverfatError(
        Reason.BACKEND_UNAVAILABLE,
        f"unknown device {device!r}, expected one of {', '.join(DEVICE_CHOICES)} or cuda:N",
    )


def device_label(device: torch.device) -> str:
    """The device as reports name it: ``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type != "cuda":
        return str(device)
    import torch

    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def resolve_model_folder(model: str, store: Path | None = None) -> Path:
    """The folder an nnU-Net model name or path points at (not yet checked for nnU-Net content).

    An existing folder wins; a string that looks like a path (has a separator, starts with ``~``
    or ``.``) must exist; anything else is looked up as ``<store>/<model>/``.
    """
    candidate = Path(model).expanduser()
    if candidate.is_dir():
        return candidate
    if candidate.exists():
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE, f"model {model!r} is a file, expected an nnU-Net v2 trained-model folder"
        )
    if _looks_like_path(model):
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE, f"model folder {candidate} does not exist (model {model!r})"
        )
    root = default_model_store() if store is None else store
    named = root / model
    if named.is_dir():
        return named
    available = store_models(root)
    raise LiverfatError(
        Reason.BACKEND_UNAVAILABLE,
        f"model {model!r} is neither {', '.join(repr(n) for n in BUILTIN_MODELS)}, nor an existing folder, "
        f"nor a model in the store {root} (it holds: {', '.join(available) if available else 'nothing'})",
    )


def load_backend(
    model: str = DEFAULT_MODEL,
    *,
    device: str = DEVICE_AUTO,
    folds: Sequence[int | str] | None = None,
    use_mirroring: bool = True,
    tile_step_size: float = NNUNET_DEFAULT_TILE_STEP_SIZE,
    checkpoint_name: str = NNUNET_CHECKPOINT_FINAL,
    orientation: str = ORIENTATION_AUTO,
    store: Path | None = None,
) -> Backend:
    """A fully initialised segmentation backend for ``model`` on ``device``.

    Parameters
    ----------
    model
        ``"default"``, a path to an nnU-Net v2 trained-model folder, or a name in the model store.
    device
        ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    folds, use_mirroring, tile_step_size, checkpoint_name, orientation
        nnU-Net options: which ``fold_N`` to ensemble (default: every fold present, or
        ``fold_all`` when it is the only one), test-time mirroring, sliding-window step as a
        fraction of the tile, which checkpoint file to load, and the voxel order the model was
        trained on (``auto`` from its plans, ``LPS``, or ``RAS`` for TotalSegmentator's models).
        They do not apply to the default model and are ignored there with a warning when changed.
    store
        The model store for named models; default :func:`default_model_store`.
    """
    if model == DEFAULT_MODEL:
        _warn_unused_nnunet_options(folds, use_mirroring, tile_step_size, checkpoint_name, orientation)
        from liverfat.inference.default_backend import DefaultBackend

        return DefaultBackend(device=device)

    from liverfat.inference.nnunet import NnUNetBackend

    return NnUNetBackend(
        resolve_model_folder(model, store),
        device=device,
        folds=folds,
        use_mirroring=use_mirroring,
        tile_step_size=tile_step_size,
        checkpoint_name=checkpoint_name,
        orientation=orientation,
    )


def describe_backend(
    model: str = DEFAULT_MODEL,
    *,
    folds: Sequence[int | str] | None = None,
    checkpoint_name: str = NNUNET_CHECKPOINT_FINAL,
    orientation: str = ORIENTATION_AUTO,
    store: Path | None = None,
) -> ModelInfo:
    """What ``load_backend`` would run (name, version, checksum), without building a network.

    The default model is described by loading it on the CPU (its weights are small).
    """
    if model == DEFAULT_MODEL:
        return load_backend(model, device="cpu").info

    from liverfat.inference.nnunet import describe_model_folder

    return describe_model_folder(
        resolve_model_folder(model, store), folds=folds, checkpoint_name=checkpoint_name, orientation=orientation
    )


def _looks_like_path(model: str) -> bool:
    path = Path(model)
    return path.is_absolute() or len(path.parts) > 1 or model.startswith(("~", "."))


def _warn_unused_nnunet_options(
    folds: Sequence[int | str] | None,
    use_mirroring: bool,
    tile_step_size: float,
    checkpoint_name: str,
    orientation: str,
) -> None:
    changed = {
        "folds": folds is not None,
        "use_mirroring": not use_mirroring,
        "tile_step_size": tile_step_size != NNUNET_DEFAULT_TILE_STEP_SIZE,
        "checkpoint_name": checkpoint_name != NNUNET_CHECKPOINT_FINAL,
        "orientation": orientation != ORIENTATION_AUTO,
    }
    ignored = [name for name, is_changed in changed.items() if is_changed]
    if ignored:
        logger.warning("nnU-Net options %s do not apply to the default model and are ignored", ", ".join(ignored))
