"""Which segmentation model to run: the registry of model names and the factory that loads one.

This module is importable without torch or nnunetv2 (the CLI reads its choices from here);
the backends themselves are imported only when a model is actually loaded.

A model is named in one of three ways:

- ``"default"``: the built-in liver network (:mod:`liverfat.inference.models.default`);
- a path to an nnU-Net v2 trained-model folder (``dataset.json``, ``plans.json``,
  ``fold_N/checkpoint_final.pth``), for example TotalSegmentator's;
- the name of a folder in liverfat's model store, ``<store>/<name>/``, by default the ``nnunet``
  folder of the model cache (``[model] cache``, default ``~/.cache/liverfat/models/nnunet/<name>/``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.devices import DEVICE_AUTO
from liverfat.inference.models.nnunet_options import (
    NNUNET_CHECKPOINT_FINAL,
    NNUNET_DEFAULT_TILE_STEP_SIZE,
    ORIENTATION_AUTO,
)
from liverfat.inference.models.precision import PRECISION_AUTO
from liverfat.inference.models.store import default_model_store, store_models
from liverfat.inference.models.weights import DEFAULT_MODEL_CACHE

if TYPE_CHECKING:
    from liverfat.inference.backend import Backend

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
"""The model name that selects the built-in network."""

BUILTIN_MODELS: dict[str, str] = {
    DEFAULT_MODEL: "built-in 3D U-Net whole-liver network (CPU or CUDA)",
}
"""Model names that are not paths or store entries, with a one-line description each."""


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
    cache_dir: Path = DEFAULT_MODEL_CACHE,
    precision: str = PRECISION_AUTO,
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
        The model store for named models; default: the one in ``cache_dir``.
    cache_dir
        The model cache (``[model] cache``): the default model's weights and the model store.
    precision
        The default model's arithmetic: ``auto``, ``fp32`` or ``bf16``
        (:mod:`liverfat.inference.models.precision`). nnU-Net models choose their own and ignore it
        with a warning when it is not ``auto``.
    """
    if model == DEFAULT_MODEL:
        _warn_unused_nnunet_options(folds, use_mirroring, tile_step_size, checkpoint_name, orientation)
        from liverfat.inference.models.default import DefaultBackend

        return DefaultBackend(device=device, cache_dir=cache_dir, precision=precision)

    if precision != PRECISION_AUTO:
        logger.warning("precision %r applies to the default model only; nnU-Net model %r ignores it", precision, model)

    from liverfat.inference.models.nnunet import NnUNetBackend

    return NnUNetBackend(
        resolve_model_folder(model, default_model_store(cache_dir) if store is None else store),
        device=device,
        folds=folds,
        use_mirroring=use_mirroring,
        tile_step_size=tile_step_size,
        checkpoint_name=checkpoint_name,
        orientation=orientation,
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
