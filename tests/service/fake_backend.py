"""The only fake in the node's tests: a segmentation backend that returns the phantom's analytic liver."""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from liverfat.inference.backend import Backend
from liverfat.result import ModelInfo
from liverfat.volume import Volume
from tests.phantom import Phantom


class PhantomLiverBackend:
    """Satisfies ``Backend``: the liver mask is the phantom's liver ellipsoid sampled on the input grid.

    ``delay_s`` makes each prediction take at least that long, so that tests can stop the
    node while a series is being processed.
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.phantom = Phantom()
        self.delay_s = delay_s

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name="phantom-truth", version="1", device="cpu")

    def predict(self, ct: Volume) -> Volume:
        time.sleep(self.delay_s)
        ni, nj, nk = ct.size
        j, i = np.mgrid[0:nj, 0:ni].astype(np.float64)
        mask = np.zeros(ct.array.shape, dtype=bool)
        for k in range(nk):  # slice by slice: a whole grid of LPS points would need gigabytes
            ijk = np.stack([i, j, np.full_like(i, k)], axis=-1)
            mask[k] = self.phantom.liver_at(ct.to_lps(ijk))
        return ct.with_array(mask)

    @classmethod
    def loader(cls, delay_s: float = 0.0) -> partial[Backend]:
        """A picklable loader for ``Node(load_model=...)``: the worker process calls it once."""
        return partial(cls, delay_s)  # type: ignore[return-value]
