"""A chest-CT phantom: the liver phantom of ``tests.phantom`` with two aerated lungs over the liver dome.

The liver, spleen and body are those of :class:`tests.phantom.Phantom` (so the phantom backend of the
node's tests finds the same liver); the lungs sit above the liver, their bases overlapping its dome as
the diaphragm does. ``CHEST_GRID`` covers the lungs from apex to base and 12 cm of upper abdomen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tests.phantom import AIR_HU, Ellipsoid, Grid, Phantom

LUNG_HU = -850.0  # aerated lung parenchyma


@dataclass(frozen=True)
class ChestPhantom(Phantom):
    """Body, lungs, spleen and liver (later ones win where they overlap), noise inside the body."""

    lungs: tuple[Ellipsoid, ...] = (
        Ellipsoid((-75.0, 0.0, 150.0), (60.0, 75.0, 130.0), LUNG_HU),  # right lung (LPS: negative x)
        Ellipsoid((75.0, 0.0, 150.0), (60.0, 75.0, 130.0), LUNG_HU),
    )

    def hu_at(self, lps: np.ndarray) -> np.ndarray:
        hu = np.full(lps.shape[:-1], AIR_HU, dtype=np.float32)
        hu[self.body.contains(lps)] = self.body.hu
        for lung in self.lungs:
            hu[lung.contains(lps)] = lung.hu
        hu[self.spleen.contains(lps)] = self.spleen.hu
        hu[self.liver.contains(lps)] = self.liver.hu
        inside = hu > AIR_HU
        rng = np.random.default_rng(self.seed)
        hu[inside] += rng.normal(0.0, self.noise_sd_hu, size=int(inside.sum())).astype(np.float32)
        return hu


# 358 mm field of view (the whole body in plane), 5 mm slices from 12 cm below the liver dome to the apices
CHEST_GRID = Grid(rows=64, columns=64, pixel_spacing_mm=5.6, slice_positions_mm=tuple(np.arange(-60.0, 270.1, 5.0)))
