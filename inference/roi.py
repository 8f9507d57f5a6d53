"""Parenchymal ROI placement of the DL-parenchymal method (pure numpy/scipy, no I/O).

The seed's code (``test_scripts/liver_seg_to_roi.py`` in johnnydfci/DL-parenchymal), on a
0.7 x 0.7 x 2.5 mm grid stored with identity LPS direction:

1. the largest liver slice ``v`` is the axial slice with the most mask voxels (first on ties);
   the ROI slices are ``v-2, v, v+2`` (5 mm apart), or ``0, 2, 4`` when ``v < 2``;
2. on each ROI slice the lateral-most liver column is the smallest column index holding
   mask, the row is the first (smallest) row of the mask in that column, and the circle's
   centre lies 30 columns (21 mm) further on, toward the patient's left;
3. the circle is a single pixel dilated by ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
   (23, 23))``: 401 pixels, 16.1 mm across, about 196 mm^2. It is not clipped to the mask.

"Smallest column index" is the patient's right only on an LPS-identity grid, so this module
first brings the mask into that canonical order from the Volume's own geometry (any
axis-aligned grid: head- or feet-first, flipped rows or columns), places the ROIs there, and
maps the label map and centres back. Distances are kept in millimetres (the seed's pixels
times its 0.7 / 2.5 mm spacing), so they mean the same thing on any working spacing.

Behaviour where the seed fails: when ``v`` lies within two slices of the top of the scan the
seed indexes past the array (IndexError); the triple is shifted inward instead, as the seed
itself does at the bottom, and both ends report ``LIVER_AT_EDGE``. An ROI slice without
liver (the seed raises on ``np.min`` of nothing) gets no ROI and reports ``ROI_NOT_PLACED``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from scipy import ndimage

from liverfat.errors import Finding, Reason
from liverfat.result import RoiRule
from liverfat.volume import Volume

logger = logging.getLogger(__name__)

SEED_SPACING_MM = (0.7, 0.7, 2.5)  # (i, j, k) of the grid the seed's pixel constants refer to
MEDIAL_OFFSET_MM = 30 * SEED_SPACING_MM[0]  # 21 mm from the lateral liver edge to the centre
ROI_DIAMETER_MM = 23 * SEED_SPACING_MM[0]  # the 23 x 23 px MORPH_ELLIPSE kernel, 16.1 mm
SLICE_GAP_MM = 2 * SEED_SPACING_MM[2]  # ROI slices v-2, v, v+2: 5 mm apart
# robust mode: the whole circle must fit in the liver eroded by this margin, and the centre
# may move at most this far from the seed's centre (further away it is another region).
ROBUST_MARGIN_MM = 2.0
ROBUST_MAX_SHIFT_MM = MEDIAL_OFFSET_MM
# Replacements for a seed ROI that fails its checks: the seed's rule on slices up to
# REPLACEMENT_MAX_SLICE_MM from the failed one (the ROI triple then still spans the seed's 10 mm),
# else the failed slice's circle moved by REPLACEMENT_SHIFTS_MM in eight directions.
REPLACEMENT_MAX_SLICE_MM = SLICE_GAP_MM
REPLACEMENT_SHIFTS_MM = (5.0, 10.0)
_AXIS_TOLERANCE = 1e-3


class RoiMode(StrEnum):
    """``seed``: the published placement, exactly. ``robust``: the same slices, but the centre
    moves to the nearest position (within ``ROBUST_MAX_SHIFT_MM``) where the whole circle
    lies inside the liver mask eroded by ``ROBUST_MARGIN_MM``, so no ROI voxel falls on
    the liver capsule, fat or lung; when no such position exists the seed's centre is kept
    (and the measurement's inside-liver check decides)."""

    SEED = "seed"
    ROBUST = "robust"


@dataclass(frozen=True)
class RoiGeometry:
    """One circle, in the index space of the grid it was placed on."""

    label: int  # 1, 2, 3 from cranial to caudal
    slice_index: int  # k
    centre_index: tuple[int, int, int]  # (i, j, k); may lie outside the grid near its border
    centre_lps: tuple[float, float, float]
    radius_mm: float  # half the kernel's extent: 8.05 mm on the working grid


@dataclass(frozen=True, eq=False)
class RoiCandidate:
    """A replacement ROI: its geometry, its voxels (index arrays into the grid) and the rule that placed it."""

    geometry: RoiGeometry
    voxels: tuple[np.ndarray, np.ndarray, np.ndarray]
    rule: RoiRule


@dataclass(frozen=True, eq=False)
class RoiPlacement:
    """The ROI label map (uint8, 0 = none) on the mask's grid, and each ROI's geometry."""

    labels: Volume
    rois: tuple[RoiGeometry, ...]
    largest_slice: int | None  # k of the largest liver slice; None without liver
    warnings: tuple[Finding, ...]


def ellipse_kernel(rows: int, columns: int) -> np.ndarray:
    """``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (columns, rows))`` as a uint8 array.

    OpenCV fills, for each row ``i`` with ``dy = i - rows // 2``, the columns
    ``c - dx .. c + dx`` where ``c = columns // 2`` and
    ``dx = cvRound(c * sqrt(1 - dy^2 / r^2))``, ``r = rows // 2``; cvRound rounds half to
    even, as ``np.rint`` does. (23, 23) gives 401 ones.
    """
    r, c = rows // 2, columns // 2
    dy = np.arange(rows) - r
    ratio = 1.0 - (dy / r) ** 2 if r else np.ones(rows)
    dx = np.rint(c * np.sqrt(np.clip(ratio, 0.0, None))).astype(int)
    column = np.arange(columns)
    inside = (np.abs(column[None, :] - c) <= dx[:, None]) & (np.abs(dy) <= r)[:, None]
    return inside.astype(np.uint8)


def place_rois(liver: Volume, mode: RoiMode = RoiMode.SEED) -> RoiPlacement:
    """The three parenchymal ROIs on ``liver``'s grid (any axis-aligned grid with axial k).

    Raises
    ------
    ValueError
        when the grid is oblique or its slices are not axial (the working grid never is).
    """
    canonical = _Canonical.of(liver)
    mask = canonical.forward(np.asarray(liver.array, dtype=bool))
    labels = np.zeros(mask.shape, dtype=np.uint8)
    areas = mask.sum(axis=(1, 2))
    if not areas.any():
        return RoiPlacement(liver.with_array(canonical.backward(labels)), (), None, ())
    largest = int(np.argmax(areas))
    slices, warnings = _roi_slices(largest, mask.shape[0], canonical)
    sx, sy = canonical.spacing[0], canonical.spacing[1]
    kernel = ellipse_kernel(_odd_pixels(ROI_DIAMETER_MM, sy), _odd_pixels(ROI_DIAMETER_MM, sx))
    offset = round(MEDIAL_OFFSET_MM / sx)
    rois = []
    for label, z in enumerate(slices, start=1):
        if not mask[z].any():
            warnings.append(
                Finding(Reason.ROI_NOT_PLACED, f"ROI slice {canonical.k_of(z)} holds no liver; ROI {label} not placed")
            )
            continue
        centre = _seed_centre(mask[z], offset)
        if mode is RoiMode.ROBUST:
            centre = _robust_centre(mask[z], centre, kernel, (sy, sx))
        if not _paint(labels[z], centre, kernel, label):
            warnings.append(Finding(Reason.ROI_NOT_PLACED, f"ROI {label} would lie wholly outside the image"))
            continue
        index = canonical.index_of((centre[1], centre[0], z))
        x, y, z_mm = (float(v) for v in liver.to_lps(index))
        rois.append(RoiGeometry(label, index[2], index, (x, y, z_mm), radius_mm=kernel.shape[1] * sx / 2))
    return RoiPlacement(
        liver.with_array(canonical.backward(labels)), tuple(rois), canonical.k_of(largest), tuple(warnings)
    )


def replacement_candidates(
    liver: Volume, placement: RoiPlacement, label: int, taken_slices: Collection[int] = ()
) -> Iterator[RoiCandidate]:
    """Replacements for ROI ``label`` of ``placement``, in order of preference.

    First the seed's rule on the slices nearest to the failed one (up to
    ``REPLACEMENT_MAX_SLICE_MM`` away, never a slice another seed ROI or a slice in
    ``taken_slices`` (k indices: earlier replacements) holds; on equal distance the
    caudal slice first, away from the dome's partial volume), then the failed circle shifted by
    ``REPLACEMENT_SHIFTS_MM`` in eight directions on its own slice, nearest first. The caller
    measures each and keeps the first that passes its checks.
    """
    canonical = _Canonical.of(liver)
    mask = canonical.forward(np.asarray(liver.array, dtype=bool))
    by_label = {roi.label: roi for roi in placement.rois}
    failed = by_label[label]
    failed_z = canonical.z_of(failed.slice_index)
    taken = {canonical.z_of(k) for k in (*(roi.slice_index for roi in placement.rois), *taken_slices)}
    sx, sy = canonical.spacing[0], canonical.spacing[1]
    kernel = ellipse_kernel(_odd_pixels(ROI_DIAMETER_MM, sy), _odd_pixels(ROI_DIAMETER_MM, sx))
    radius_mm = kernel.shape[1] * sx / 2
    reach = round(REPLACEMENT_MAX_SLICE_MM / canonical.spacing[2])
    for distance in range(1, reach + 1):
        for z in (failed_z - distance, failed_z + distance):
            if z in taken or not 0 <= z < mask.shape[0] or not mask[z].any():
                continue
            centre = _seed_centre(mask[z], round(MEDIAL_OFFSET_MM / sx))
            yield _candidate(liver, canonical, z, centre, kernel, label, radius_mm, RoiRule.NEXT_SLICE)
    row, column = canonical.forward_index(failed.centre_index)
    for shift_mm in REPLACEMENT_SHIFTS_MM:
        for angle in np.arange(8) * np.pi / 4:
            centre = (round(row + shift_mm * np.sin(angle) / sy), round(column + shift_mm * np.cos(angle) / sx))
            yield _candidate(liver, canonical, failed_z, centre, kernel, label, radius_mm, RoiRule.SHIFTED)


def _candidate(
    liver: Volume,
    canonical: _Canonical,
    z: int,
    centre: tuple[int, int],
    kernel: np.ndarray,
    label: int,
    radius_mm: float,
    rule: RoiRule,
) -> RoiCandidate:
    stamp = np.zeros(canonical.canonical_shape[1:], dtype=bool)
    _paint(stamp, centre, kernel, 1)
    rows, columns = np.nonzero(stamp)
    index = canonical.index_of((centre[1], centre[0], z))
    x, y, z_mm = (float(v) for v in liver.to_lps(index))
    geometry = RoiGeometry(label, index[2], index, (x, y, z_mm), radius_mm=radius_mm)
    return RoiCandidate(geometry, canonical.array_index(np.full(rows.shape, z), rows, columns), rule)


def _roi_slices(largest: int, n_slices: int, canonical: _Canonical) -> tuple[list[int], list[Finding]]:
    """Canonical slice indices, cranial first, and the warnings their choice raises."""
    gap = round(SLICE_GAP_MM / canonical.spacing[2])
    if n_slices < 2 * gap + 1:
        reason = f"{n_slices} axial slices; three ROIs {SLICE_GAP_MM:g} mm apart need {2 * gap + 1}"
        return [], [Finding(Reason.ROI_NOT_PLACED, reason)]
    centre = min(max(largest, gap), n_slices - 1 - gap)
    warnings = []
    if centre != largest:
        end = "inferior" if largest < gap else "superior"
        warnings.append(
            Finding(
                Reason.LIVER_AT_EDGE,
                f"the largest liver slice (k={canonical.k_of(largest)}) lies within {SLICE_GAP_MM:g} mm of the "
                f"{end} end of the scan: the liver is probably cut off there, so its true largest "
                f"cross-section may be outside the scan; ROI slices moved inward",
            )
        )
    return [centre + gap, centre, centre - gap], warnings


def _seed_centre(mask2d: np.ndarray, offset: int) -> tuple[int, int]:
    """(row, column): first row of the lateral-most (smallest x) column, ``offset`` columns medial."""
    column = int(np.flatnonzero(mask2d.any(axis=0))[0])
    row = int(np.flatnonzero(mask2d[:, column])[0])
    return row, column + offset


def _robust_centre(
    mask2d: np.ndarray, centre: tuple[int, int], kernel: np.ndarray, spacing: tuple[float, float]
) -> tuple[int, int]:
    """The admissible centre nearest to ``centre``: see ``RoiMode``."""
    margin_rows, margin_columns = (round(ROBUST_MARGIN_MM / s) for s in spacing)
    fit = ellipse_kernel(kernel.shape[0] + 2 * margin_rows, kernel.shape[1] + 2 * margin_columns)
    # Eroded on the liver's box only: outside it there is no liver, so nothing there is admissible,
    # and within it the box's border reads as the empty surroundings it stands for.
    ((row_box, column_box),) = ndimage.find_objects(mask2d.view(np.uint8))
    admissible = ndimage.binary_erosion(mask2d[row_box, column_box], structure=fit, border_value=0)
    rows, columns = np.nonzero(admissible)
    rows, columns = rows + row_box.start, columns + column_box.start
    if rows.size == 0:
        logger.info("no position on this slice fits the ROI inside the liver; the seed's centre is kept")
        return centre
    distance = np.hypot((rows - centre[0]) * spacing[0], (columns - centre[1]) * spacing[1])
    nearest = int(np.argmin(distance))
    if distance[nearest] > ROBUST_MAX_SHIFT_MM:
        logger.info("nearest position inside the liver is %.1f mm away; the seed's centre is kept", distance[nearest])
        return centre
    return int(rows[nearest]), int(columns[nearest])


def _paint(labels2d: np.ndarray, centre: tuple[int, int], kernel: np.ndarray, label: int) -> int:
    """Stamp ``kernel`` centred on ``centre`` (cv2.dilate of one pixel), clipped to the slice.

    Returns the number of pixels painted.
    """
    half = (kernel.shape[0] // 2, kernel.shape[1] // 2)
    target, source = [], []
    for axis in range(2):
        low = centre[axis] - half[axis]
        start, stop = max(low, 0), min(low + kernel.shape[axis], labels2d.shape[axis])
        target.append(slice(start, max(stop, start)))
        source.append(slice(start - low, max(stop, start) - low))
    stamp = kernel[source[0], source[1]] > 0
    labels2d[target[0], target[1]][stamp] = label
    return int(stamp.sum())


def _odd_pixels(length_mm: float, spacing_mm: float) -> int:
    """The odd pixel count nearest to ``length_mm`` (a kernel needs a centre pixel)."""
    return 2 * round((length_mm / spacing_mm - 1) / 2) + 1


@dataclass(frozen=True)
class _Canonical:
    """How an axis-aligned grid's array maps onto the canonical LPS array ``[z, y, x]``.

    ``axes[c]`` is the input array axis holding canonical axis ``c`` (z, y, x) and
    ``flips[c]`` whether it runs the other way (toward right, anterior or inferior).
    """

    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    shape: tuple[int, int, int]  # input array shape
    spacing: tuple[float, float, float]  # canonical (x, y, z) spacing, mm

    @classmethod
    def of(cls, volume: Volume) -> _Canonical:
        direction = volume.direction
        physical = np.argmax(np.abs(direction), axis=0)  # physical axis of index axis i, j, k
        if sorted(physical) != [0, 1, 2] or not np.allclose(
            np.abs(direction[physical, range(3)]), 1.0, atol=_AXIS_TOLERANCE
        ):
            raise ValueError(f"ROIs need an axis-aligned grid, got direction {direction.tolist()}")
        if physical[2] != 2:
            raise ValueError(f"ROIs are placed on axial slices, but the grid's k axis runs along {'LPS'[physical[2]]}")
        x_axis, y_axis, z_axis = (int(np.flatnonzero(physical == p)[0]) for p in range(3))  # index axes
        return cls(
            axes=(2 - z_axis, 2 - y_axis, 2 - x_axis),
            flips=(bool(direction[2, z_axis] < 0), bool(direction[1, y_axis] < 0), bool(direction[0, x_axis] < 0)),
            shape=volume.array.shape,
            spacing=(volume.spacing[x_axis], volume.spacing[y_axis], volume.spacing[z_axis]),
        )

    def forward(self, array: np.ndarray) -> np.ndarray:
        canonical = np.transpose(array, self.axes)
        return canonical[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def backward(self, canonical: np.ndarray) -> np.ndarray:
        unflipped = canonical[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return np.ascontiguousarray(np.transpose(unflipped, np.argsort(self.axes)))

    def index_of(self, xyz: tuple[int, int, int]) -> tuple[int, int, int]:
        """Input (i, j, k) of canonical (x, y, z) indices."""
        ijk = [0, 0, 0]
        for c, value in enumerate(reversed(xyz)):  # c: canonical array axis (z, y, x)
            axis = self.axes[c]
            ijk[2 - axis] = self.shape[axis] - 1 - value if self.flips[c] else value
        return ijk[0], ijk[1], ijk[2]

    def k_of(self, z: int) -> int:
        """Input slice index k of canonical slice ``z`` (k is axial)."""
        return self.index_of((0, 0, z))[2]

    def z_of(self, k: int) -> int:
        """Canonical slice ``z`` of input slice index k (the inverse of ``k_of``)."""
        return self.shape[self.axes[0]] - 1 - k if self.flips[0] else k

    def forward_index(self, ijk: tuple[int, int, int]) -> tuple[int, int]:
        """Canonical (row, column) = (y, x) of input index (i, j, k)."""
        yx = []
        for c in (1, 2):
            axis = self.axes[c]
            value = ijk[2 - axis]
            yx.append(self.shape[axis] - 1 - value if self.flips[c] else value)
        return yx[0], yx[1]

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return self.shape[self.axes[0]], self.shape[self.axes[1]], self.shape[self.axes[2]]

    def array_index(
        self, z: np.ndarray, y: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Input array index arrays of canonical voxels (z, y, x)."""
        index: list[np.ndarray] = [z, z, z]
        for c, values in enumerate((z, y, x)):
            axis = self.axes[c]
            index[axis] = self.shape[axis] - 1 - values if self.flips[c] else values
        return index[0], index[1], index[2]
