"""Choosing a model: names, paths, the model store, devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liverfat.errors import LiverfatError, Reason
from liverfat.inference.backend import Backend
from liverfat.inference.models.devices import resolve_device
from liverfat.inference.models.nnunet import NnUNetBackend
from liverfat.inference.models.registry import load_backend, resolve_model_folder
from liverfat.inference.models.store import default_model_store, store_models
from tests.inference.tiny_nnunet import write_tiny_model


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding one tiny nnU-Net model named ``tiny``."""
    root = tmp_path_factory.mktemp("store")
    write_tiny_model(root / "tiny")
    (root / "not-a-model").mkdir()
    return root


def test_registry_and_devices_import_without_torch_or_nnunet() -> None:
    code = (
        "import sys, liverfat.inference.models.registry, liverfat.inference.models.devices as m; "
        "print(sorted(n for n in ('torch', 'nnunetv2') if n in sys.modules), m.DEVICE_CHOICES)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[] ('auto', 'cpu', 'cuda')"


def test_load_backend_from_a_folder_path(store: Path) -> None:
    backend = load_backend(str(store / "tiny"), device="cpu", folds=[0], use_mirroring=False)

    assert isinstance(backend, NnUNetBackend)
    assert isinstance(backend, Backend)
    assert backend.predictor.use_mirroring is False


def test_load_backend_by_name_looks_in_the_model_store(store: Path) -> None:
    backend = load_backend("tiny", device="cpu", store=store)

    assert isinstance(backend, NnUNetBackend)
    assert backend.folder.path == store / "tiny"


def test_the_model_cache_holds_the_store_and_the_default_weights(store: Path, tmp_path: Path) -> None:
    """One folder holds everything a backend is loaded from (``[model] cache``)."""
    cache = tmp_path / "cache"
    (cache / "nnunet").mkdir(parents=True)
    (cache / "nnunet" / "tiny").symlink_to(store / "tiny")
    assert default_model_store(cache) == cache / "nnunet"
    assert store_models(default_model_store(cache)) == ["tiny"]
    assert isinstance(load_backend("tiny", device="cpu", cache_dir=cache), NnUNetBackend)
    with pytest.raises(LiverfatError, match=f"are not in {cache}: run `liverfat models fetch`"):
        load_backend(device="cpu", cache_dir=cache)
    with pytest.raises(LiverfatError, match=f"not in {cache}"):
        load_backend(cache_dir=cache)
    assert isinstance(load_backend("tiny", device="cpu", cache_dir=cache), NnUNetBackend)


def test_store_lists_only_folders_holding_a_model(store: Path, tmp_path: Path) -> None:
    assert store_models(store) == ["tiny"]
    assert store_models(tmp_path / "absent") == []


def test_missing_model_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(LiverfatError, match="model folder .*nowhere does not exist") as caught:
        load_backend(str(tmp_path / "nowhere"), device="cpu")
    assert caught.value.reason is Reason.BACKEND_UNAVAILABLE


def test_unknown_model_name_lists_what_the_store_holds(store: Path) -> None:
    with pytest.raises(LiverfatError, match=r"model 'seed' is neither 'default'.*it holds: tiny\)"):
        resolve_model_folder("seed", store)


def test_a_file_is_not_a_model_folder(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint_final.pth"
    checkpoint.write_bytes(b"")

    with pytest.raises(LiverfatError, match="is a file, expected an nnU-Net v2 trained-model folder"):
        resolve_model_folder(str(checkpoint))


def test_cpu_and_auto_devices_resolve() -> None:
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("AUTO").type == expected_auto


def test_unknown_device_lists_the_choices() -> None:
    with pytest.raises(LiverfatError, match="unknown device 'gpu', expected one of auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(LiverfatError, match="sees no CUDA GPU") as caught:
        resolve_device("cuda")
    assert caught.value.reason is Reason.BACKEND_UNAVAILABLE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_index_beyond_the_gpus_present_is_refused() -> None:
    with pytest.raises(LiverfatError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
