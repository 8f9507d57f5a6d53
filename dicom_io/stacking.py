"""The slices of one series as a stack: their geometry, order, spacing and tilt.

Pure header arithmetic (no pixels): parse Image Position/Orientation (Patient) and Pixel
Spacing, require one orientation and size, order the slices along the normal, check that
they are evenly spaced, and describe the grid they form in LPS.

References
----------
DICOM PS3.3 C.7.6.2.1.1 (Image Position and Orientation), C.7.6.2 (Image Plane Module).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_description, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from liverfat.errors import Finding, LiverfatError, Reason

MIN_SLICES = 3
SPACING_JITTER_FRACTION = 0.10  # of the median step between slices
SAME_POSITION_MM = 0.01  # closer than this along the normal: the same slice position
ORIENTATION_TOLERANCE = 1e-3  # largest accepted difference between direction cosines
PIXEL_SPACING_TOLERANCE_MM = 1e-4
TILT_DRIFT_PIXELS = 0.1  # in-plane drift over the whole stack below this is not a tilt
OFF_LINE_PIXELS = 0.5  # a slice further than this from the stacking line is an error
MAX_LISTED = 5  # values quoted in one error message


def tag_label(keyword: str) -> str:
    """``(gggg,eeee) 'Name'`` for messages."""
    return f"{Tag(tag_for_keyword(keyword) or 0)} '{dictionary_description(keyword)}'"


def header_number(dataset: Dataset, keyword: str) -> float | None:
    """A numeric attribute, or None when it is absent, empty or not a number."""
    try:
        return float(dataset.get(keyword))
    except (TypeError, ValueError):
        return None


def required_number(dataset: Dataset, keyword: str, source: Path | str) -> float:
    value = header_number(dataset, keyword)
    if value is None:
        raise LiverfatError(
            Reason.MISSING_ATTRIBUTE,
            f"{source}: {tag_label(keyword)} is {dataset.get(keyword)!r}; expected a number",
        )
    if not math.isfinite(value):
        raise LiverfatError(
            Reason.INVALID_ATTRIBUTE, f"{source}: {tag_label(keyword)} is {dataset.get(keyword)}, expected a finite number"
        )
    return value


@dataclass(frozen=True, eq=False)
class SliceHeader:
    """The geometry of one slice, parsed from its header."""

    path: Path
    header: Dataset
    position: np.ndarray  # LPS of the centre of the first pixel
    row_direction: np.ndarray  # direction of increasing column index
    column_direction: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as in (0028,0030)
    shape: tuple[int, int]  # (Rows, Columns)

    @classmethod
    def parse(cls, path: Path, header: Dataset) -> SliceHeader:
        position = _vector(header, "ImagePositionPatient", 3, path)
        orientation = _vector(header, "ImageOrientationPatient", 6, path)
        spacing = _vector(header, "PixelSpacing", 2, path)
        row, column = orientation[:3], orientation[3:]
        norms = np.linalg.norm(row), np.linalg.norm(column)
        if min(norms) < 0.5 or abs(float(row @ column)) > ORIENTATION_TOLERANCE * max(norms) ** 2 or min(spacing) <= 0:
            raise LiverfatError(
                Reason.MISSING_ATTRIBUTE,
                f"{path}: invalid geometry: {tag_label('ImageOrientationPatient')} {list(orientation)} must hold two "
                f"orthogonal unit vectors and {tag_label('PixelSpacing')} {list(spacing)} must be positive",
            )
        shape = (int(required_number(header, "Rows", path)), int(required_number(header, "Columns", path)))
        return cls(path, header, position, row / norms[0], column / norms[1], (spacing[0], spacing[1]), shape)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)


def _vector(header: Dataset, keyword: str, length: int, path: Path) -> np.ndarray:
    value = header.get(keyword)
    try:
        vector = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        vector = np.empty(0)
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise LiverfatError(
            Reason.MISSING_ATTRIBUTE,
            f"{path}: {tag_label(keyword)} is {value!r}; expected {length} numbers",
        )
    return vector


def check_uniform(slices: list[SliceHeader]) -> None:
    first = slices[0]
    other = [s for s in slices if not _parallel(s, first)]
    if other:
        raise LiverfatError(
            Reason.MIXED_SIZES,
            f"slices are not parallel: {tag_label('ImageOrientationPatient')} is "
            f"{rounded(first.row_direction, first.column_direction)} in {first.path} but "
            f"{rounded(other[0].row_direction, other[0].column_direction)} in {other[0].path} "
            f"({len(other)} of {len(slices)} files differ); expected one orientation per series",
        )
    _require_one_value(slices, lambda s: s.shape, "Rows (0028,0010) x Columns (0028,0011)")
    _require_one_value(
        slices,
        lambda s: tuple(round(v / PIXEL_SPACING_TOLERANCE_MM) * PIXEL_SPACING_TOLERANCE_MM for v in s.pixel_spacing),
        tag_label("PixelSpacing"),
    )


def _parallel(a: SliceHeader, b: SliceHeader) -> bool:
    return bool(
        np.abs(a.row_direction - b.row_direction).max() <= ORIENTATION_TOLERANCE
        and np.abs(a.column_direction - b.column_direction).max() <= ORIENTATION_TOLERANCE
    )


def rounded(*vectors: np.ndarray) -> list[float]:
    return [round(float(v), 4) for v in np.concatenate(vectors)]


def _require_one_value(slices: list[SliceHeader], key: Callable[[SliceHeader], Hashable], name: str) -> None:
    counts = Counter(key(s) for s in slices)
    if len(counts) > 1:
        observed = ", ".join(f"{value} in {count} files" for value, count in counts.most_common(MAX_LISTED))
        raise LiverfatError(Reason.MIXED_SIZES, f"{name} varies within the series: {observed}; expected one value")


# ---------------------------------------------------------------------------------------
# geometry of the stack


@dataclass(frozen=True, eq=False)
class Stack:
    """Slices grouped by position along the normal, and the grid they form."""

    groups: list[list[SliceHeader]]  # one group per distinct position, in increasing order
    origin: tuple[float, float, float]
    direction: np.ndarray
    spacing: tuple[float, float, float]
    warnings: tuple[Finding, ...]

    @classmethod
    def build(cls, slices: list[SliceHeader]) -> Stack:
        """The grid of ``slices``: k runs along the normal; a gantry tilt makes it a sheared grid.

        With a tilted gantry the slices are stacked along the table, not along their normal.
        The third direction column is then the stacking direction, which SimpleITK resamples
        exactly (its index-to-physical matrix need not be orthogonal).
        """
        first, normal = slices[0], slices[0].normal
        groups = _group_by_position(slices, normal)
        positions = np.stack([group[0].position for group in groups])
        distances = positions @ normal
        _check_steps(distances)
        step_vector = (positions[-1] - positions[0]) / (len(groups) - 1)
        step_along_normal = float(step_vector @ normal)
        shear_per_mm = (step_vector - step_along_normal * normal) / step_along_normal
        pixel = min(first.pixel_spacing)
        _check_on_one_line(positions, distances - distances[0], normal + shear_per_mm, OFF_LINE_PIXELS * pixel)
        drift = float(np.linalg.norm(shear_per_mm)) * (distances[-1] - distances[0])
        if drift > TILT_DRIFT_PIXELS * pixel:
            stacking, step = step_vector / np.linalg.norm(step_vector), float(np.linalg.norm(step_vector))
            warnings = [_tilt_warning(first.header, float(np.degrees(np.arctan(np.linalg.norm(shear_per_mm)))))]
        else:
            stacking, step = normal, step_along_normal
            warnings = _tilt_tag_warning(first.header)
        return cls(
            groups=groups,
            origin=(float(positions[0][0]), float(positions[0][1]), float(positions[0][2])),
            direction=np.column_stack([first.row_direction, first.column_direction, stacking]),
            spacing=(first.pixel_spacing[1], first.pixel_spacing[0], step),
            warnings=tuple(warnings),
        )


def _group_by_position(slices: list[SliceHeader], normal: np.ndarray) -> list[list[SliceHeader]]:
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))  # stable: path order among equals
    groups: list[list[SliceHeader]] = []
    for s in ordered:
        if groups and float((s.position - groups[-1][0].position) @ normal) <= SAME_POSITION_MM:
            groups[-1].append(s)
        else:
            groups.append([s])
    if len(groups) < MIN_SLICES:
        raise LiverfatError(
            Reason.TOO_FEW_SLICES,
            f"observed {len(groups)} distinct slice position(s) in {len(slices)} files; expected at least {MIN_SLICES}",
        )
    return groups


def _check_on_one_line(positions: np.ndarray, along: np.ndarray, line: np.ndarray, tolerance_mm: float) -> None:
    """Every slice origin must lie on ``positions[0] + along * line`` (one constant tilt)."""
    off_line = np.linalg.norm(positions - positions[0] - np.outer(along, line), axis=1)
    worst = int(np.argmax(off_line))
    if off_line[worst] > tolerance_mm:
        raise LiverfatError(
            Reason.GANTRY_TILT,
            f"slice positions do not lie on one line: {tag_label('ImagePositionPatient')} "
            f"{rounded(positions[worst])} is {off_line[worst]:.2f} mm off the line from {rounded(positions[0])} "
            f"to {rounded(positions[-1])} (a variable tilt or shifted slices); expected under {tolerance_mm:.2f} mm",
        )


def _check_steps(distances: np.ndarray) -> None:
    steps = np.diff(distances)
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > SPACING_JITTER_FRACTION * median)
    if len(bad):
        observed = "; ".join(
            f"{steps[i]:.2f} mm between {distances[i]:.2f} and {distances[i + 1]:.2f} mm" for i in bad[:MAX_LISTED]
        )
        raise LiverfatError(
            Reason.UNEVEN_SPACING,
            f"slice positions along the normal are unevenly spaced ({len(bad)} of {len(steps)} steps): {observed}; "
            f"expected every step within {SPACING_JITTER_FRACTION:.0%} of the median step {median:.2f} mm "
            f"(missing slices?), see {tag_label('ImagePositionPatient')}",
        )


def _tilt_warning(header: Dataset, angle_deg: float) -> Finding:
    tag_tilt = header_number(header, "GantryDetectorTilt")
    return Finding(
        Reason.GANTRY_TILT,
        f"slices stack at {angle_deg:.2f} deg to their normal (gantry tilt; {tag_label('GantryDetectorTilt')} "
        f"{'absent' if tag_tilt is None else f'{tag_tilt:g} deg'}); the volume keeps the source slices on a "
        "sheared grid",
    )


def _tilt_tag_warning(header: Dataset) -> list[Finding]:
    tag_tilt = header_number(header, "GantryDetectorTilt")
    if not tag_tilt:
        return []
    return [
        Finding(
            Reason.GANTRY_TILT,
            f"{tag_label('GantryDetectorTilt')} is {tag_tilt:g} deg but the slices stack along their normal; "
            "the geometry was taken from the slice positions",
        )
    ]
