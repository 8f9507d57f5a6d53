"""liverfat's model store: the folder of named nnU-Net models inside the model cache."""

from __future__ import annotations

from pathlib import Path

from liverfat.inference.models.weights import DEFAULT_MODEL_CACHE

MODEL_STORE_FOLDER = "nnunet"
"""The model store's folder in the model cache, unless a store is given explicitly."""


def default_model_store(cache_dir: Path = DEFAULT_MODEL_CACHE) -> Path:
    """The folder that holds named nnU-Net models: ``nnunet`` in the model cache ``cache_dir``."""
    return cache_dir.expanduser() / MODEL_STORE_FOLDER


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
