"""The contract between inference, the DICOM writers and the service: one analysis result.

It lives in the root package so that ``dicom_io`` (which writes SEG/SR from it) and
``inference`` (which produces it) can both use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from liverfat.errors import Finding
from liverfat.volume import Volume


class Grade(StrEnum):
    MODERATE_TO_SEVERE = "moderate-to-severe"
    NONE_OR_MILD = "none-or-mild"
    NOT_GRADED = "not-graded"


class RoiRule(StrEnum):
    """How an ROI was placed: the seed's rule, or a replacement for a seed ROI that failed its checks."""

    SEED = "seed"  # the published placement on slice v-2, v or v+2
    NEXT_SLICE = "next-slice"  # the seed's rule on the nearest slice whose ROI passes the checks
    SHIFTED = "shifted"  # the seed's slice, centre moved away from the vessel inside the liver


@dataclass(frozen=True)
class ModelInfo:
    """Which segmentation produced the liver mask."""

    name: str
    version: str
    checksum: str | None = None
    device: str | None = None
    precision: str | None = None  # the network's arithmetic (fp32, bf16) where the backend has a choice

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "checksum": self.checksum, "device": self.device,
                "precision": self.precision}  # fmt: skip


USER_MASK = ModelInfo(name="user-mask", version="n/a")


@dataclass(frozen=True)
class RoiMeasurement:
    """One parenchymal circle on one slice of the working grid (0.7 x 0.7 x 2.5 mm)."""

    label: int  # 1, 2, 3 from cranial to caudal
    slice_index: int  # k on the working grid
    z_mm: float  # LPS z of the slice
    centre_lps: tuple[float, float, float]
    radius_mm: float
    area_mm2: float
    n_voxels: int
    mean_hu: float
    sd_hu: float
    inside_liver_fraction: float
    rule: RoiRule = RoiRule.SEED

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "slice_index": self.slice_index,
            "z_mm": round(self.z_mm, 3),
            "centre_lps": [round(c, 3) for c in self.centre_lps],
            "radius_mm": round(self.radius_mm, 3),
            "area_mm2": round(self.area_mm2, 2),
            "n_voxels": self.n_voxels,
            "mean_hu": round(self.mean_hu, 2),
            "sd_hu": round(self.sd_hu, 2),
            "inside_liver_fraction": round(self.inside_liver_fraction, 4),
            "rule": self.rule.value,
        }


@dataclass(frozen=True, eq=False)
class Masks:
    """Liver mask and ROI label map (0 = none, 1..3 = ROI) on one grid."""

    liver: Volume  # bool array
    rois: Volume  # uint8 array


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """Everything measured on one series, and why a grade was or was not given."""

    series_uid: str
    study_uid: str | None
    eligible: bool
    reasons: tuple[Finding, ...]
    grade: Grade
    threshold_hu: float
    parenchymal_hu: float | None
    volumetric_hu: float | None
    axial_hu: float | None
    liver_volume_ml: float | None
    rois: tuple[RoiMeasurement, ...]
    warnings: tuple[Finding, ...]
    model: ModelInfo
    software_version: str
    timings_s: dict[str, float] = field(default_factory=dict)
    # The value the grade rests on: DL-parenchymal of ``rois`` (which may hold replacements for
    # seed ROIs that failed their checks); ``parenchymal_hu`` stays the seed-exact figure.
    graded_hu: float | None = None
    grade_basis: str = ""  # why the grade rests on ``graded_hu``, in words
    borderline: bool = False  # graded_hu within borderline_margin_hu of the threshold: look
    borderline_margin_hu: float = 0.0
    working_masks: Masks | None = None  # on the 0.7 x 0.7 x 2.5 mm grid
    source_masks: Masks | None = None  # on the source series' own grid

    def value_text(self) -> str:
        """The measured value in a few words: the graded value, and the seed ROIs' when they differ."""
        if self.graded_hu is not None and self.parenchymal_hu is not None and round(self.graded_hu, 1) != round(
            self.parenchymal_hu, 1
        ):
            return f"graded on {self.graded_hu:.1f} HU (seed ROIs {self.parenchymal_hu:.1f} HU)"
        if self.parenchymal_hu is not None:
            return f"DL-parenchymal {self.parenchymal_hu:.1f} HU"
        return ""

    def to_json(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(float(value), 2)

        return {
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "eligible": self.eligible,
            "reasons": [r.to_json() for r in self.reasons],
            "grade": self.grade.value,
            "threshold_hu": self.threshold_hu,
            "parenchymal_hu": rounded(self.parenchymal_hu),
            "graded_hu": rounded(self.graded_hu),
            "grade_basis": self.grade_basis,
            "borderline": self.borderline,
            "borderline_margin_hu": self.borderline_margin_hu,
            "volumetric_hu": rounded(self.volumetric_hu),
            "axial_hu": rounded(self.axial_hu),
            "liver_volume_ml": rounded(self.liver_volume_ml),
            "rois": [roi.to_json() for roi in self.rois],
            "warnings": [w.to_json() for w in self.warnings],
            "model": self.model.to_json(),
            "software_version": self.software_version,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
        }
