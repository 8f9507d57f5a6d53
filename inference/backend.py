"""The segmentation backend interface: a CT volume in, a liver mask on the same grid out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from liverfat.result import ModelInfo
from liverfat.volume import Volume


@runtime_checkable
class Backend(Protocol):
    """A fully initialised segmentation model (weights loaded, device chosen).

    ``predict`` receives the CT in HU on the working grid (0.7 x 0.7 x 2.5 mm, LPS) and
    returns a boolean liver mask as a ``Volume`` on exactly that grid. Backends resample
    internally to whatever their network needs.
    """

    @property
    def info(self) -> ModelInfo: ...

    def predict(self, ct: Volume) -> Volume: ...
