"""A CT volume held as a numpy array plus its physical LPS geometry.

Conventions (the same as SimpleITK, so conversion is a copy, not a transpose):

- ``array`` is indexed ``[k, j, i]`` (slice, row, column);
- ``spacing``, ``origin`` and the columns of ``direction`` are given in index order
  ``(i, j, k)``;
- physical position (DICOM patient coordinates, LPS, mm) of voxel ``(i, j, k)`` is
  ``origin + direction @ (spacing * (i, j, k))``.

``to_lps`` / ``to_index`` are the only places where index order and physical
order meet; every other module works through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxel data on a regular grid in LPS patient coordinates."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a volume needs a 3-D array, got shape {self.array.shape}")
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))

    @property
    def size(self) -> tuple[int, int, int]:
        """Number of voxels along (i, j, k)."""
        nk, nj, ni = self.array.shape
        return (ni, nj, nk)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix from homogeneous (i, j, k, 1) to LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    def to_lps(self, ijk: npt.ArrayLike) -> np.ndarray:
        """LPS position (mm) of continuous index coordinates ``(..., 3)`` in (i, j, k) order."""
        points = np.asarray(ijk, dtype=np.float64)
        return points @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_index(self, lps: npt.ArrayLike) -> np.ndarray:
        """Continuous (i, j, k) index of LPS positions ``(..., 3)``."""
        points = np.asarray(lps, dtype=np.float64) - self.affine[:3, 3]
        return points @ np.linalg.inv(self.affine[:3, :3]).T

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding other voxel data (a mask, a label map)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction)

    def same_grid(self, other: Volume, tolerance_mm: float = 1e-3) -> bool:
        """True when both volumes have the same shape and voxel positions."""
        return self.array.shape == other.array.shape and bool(
            np.allclose(self.affine, other.affine, atol=tolerance_mm)
        )

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.flatten()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.asarray(image.GetDirection()).reshape(3, 3),
        )
