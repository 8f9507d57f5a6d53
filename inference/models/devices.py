"""Where a model runs: the accepted ``device`` values and their ``torch.device``.

Importable without torch; torch is imported only when a device is resolved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from liverfat.errors import LiverfatError, Reason

if TYPE_CHECKING:
    import torch

DEVICE_AUTO = "auto"
DEVICE_CHOICES: tuple[str, ...] = (DEVICE_AUTO, "cpu", "cuda")
"""Accepted ``device`` values; ``cuda:N`` selects one GPU among several."""


def device_problem(device: str) -> str | None:
    """Why ``device`` is not an accepted device name, or ``None`` when it is (does not look for a GPU)."""
    name = device.strip().lower()
    if name in DEVICE_CHOICES:
        return None
    index = name.removeprefix("cuda:")
    if name.startswith("cuda:") and index.isdigit():
        return None
    return f"unknown device {device!r}, expected one of {', '.join(DEVICE_CHOICES)} or cuda:N"


def resolve_device(device: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a ``torch.device`` that exists here.

    ``auto`` picks the first CUDA GPU when torch sees one and the CPU otherwise.
    """
    problem = device_problem(device)
    if problem is not None:
        raise LiverfatError(Reason.BACKEND_UNAVAILABLE, problem)
    import torch

    name = device.strip().lower()
    if name == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"device {device!r} was requested but torch {torch.__version__} sees no CUDA GPU; "
            f"use device 'cpu' or 'auto'",
        )
    index_text = name.partition(":")[2]
    if index_text and int(index_text) >= torch.cuda.device_count():
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s), "
            f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}",
        )
    return torch.device(name)


def device_label(device: torch.device) -> str:
    """The device as reports name it: ``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type != "cuda":
        return str(device)
    import torch

    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
