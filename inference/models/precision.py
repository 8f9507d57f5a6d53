"""The default network's arithmetic: the ``[model] precision`` setting resolved against the device.

``fp32`` is the reference. ``bf16`` runs the network's convolutions and activations in bfloat16
with the normalisation statistics accumulated in float32 (``liverfat.inference.models.unet``);
it is offered only where the hardware has bf16 dot products, since elsewhere torch emulates them
more slowly than float32:

- CPU: AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) or AMX-BF16 (Intel
  Sapphire Rapids and later), as torch's own CPU feature checks report them;
- CUDA: a GPU of compute capability 8.0 (Ampere) or later.

``auto`` picks ``bf16`` where it is offered and ``fp32`` elsewhere. int8 is not offered: see the
README's speed section for what was tried.

Importable without torch; torch is imported only when a precision is resolved.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING

from liverfat.errors import LiverfatError, Reason

if TYPE_CHECKING:
    import torch

PRECISION_AUTO = "auto"


class Precision(StrEnum):
    """The arithmetic the default network runs in."""

    FP32 = "fp32"
    BF16 = "bf16"


PRECISION_CHOICES: tuple[str, ...] = (PRECISION_AUTO, *(p.value for p in Precision))
"""Accepted ``precision`` values."""


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 dot products in hardware (not torch's float32 emulation)."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(
    requested: str,
    device: torch.device,
    has_native_bf16: Callable[[torch.device], bool] = native_bf16,
) -> Precision:
    """The precision to run in on ``device`` for the setting ``requested`` (``auto``, ``fp32``, ``bf16``).

    An explicit ``bf16`` on a device without bf16 hardware is refused rather than emulated: the
    emulation gives the same masks as bf16 hardware but runs slower than ``fp32``.
    """
    name = requested.strip().lower()
    if name not in PRECISION_CHOICES:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"unknown precision {requested!r}, expected one of {', '.join(PRECISION_CHOICES)}",
        )
    if name == Precision.FP32:
        return Precision.FP32
    if has_native_bf16(device):
        return Precision.BF16
    if name == Precision.BF16:
        raise LiverfatError(
            Reason.BACKEND_UNAVAILABLE,
            f"precision 'bf16' was requested but device {device} has no bf16 hardware (CPU: AVX512-BF16 or "
            f"AMX-BF16; CUDA: compute capability 8.0 or later); use precision 'auto' or 'fp32'",
        )
    return Precision.FP32
