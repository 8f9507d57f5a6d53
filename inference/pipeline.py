"""One series through the DL-parenchymal method: resample, segment, ROIs, measure, grade.

Everything runs on the canonical 0.7 x 0.7 x 2.5 mm working grid (``dicom_io.resample``);
the liver mask and the ROI label map are then mapped back onto the source series' own grid
for the DICOM SEG. The caller decides eligibility (``dicom_io`` header filter): an ineligible
series is still measured, for research, but never graded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from liverfat import __version__
from liverfat.dicom_io.resample import WORKING_SPACING_MM, mask_to_grid, mask_to_source, nonzero_box, to_working_grid
from liverfat.dicom_io.series import CTSeries
from liverfat.errors import Finding, LiverfatError, Reason
from liverfat.inference.attenuation import measure
from liverfat.inference.backend import Backend
from liverfat.inference.grading import GradingConfig, grade, grade_basis, is_borderline
from liverfat.inference.roi import RoiMode, place_rois
from liverfat.result import USER_MASK, AnalysisResult, Grade, Masks, ModelInfo
from liverfat.volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisConfig:
    """How to analyse a series; the working spacing is the seed's unless a study says otherwise."""

    roi_mode: RoiMode = RoiMode.SEED
    grading: GradingConfig = field(default_factory=GradingConfig)
    working_spacing_mm: tuple[float, float, float] = WORKING_SPACING_MM

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "roi_mode", RoiMode(self.roi_mode))
        except ValueError as error:
            raise ValueError(
                f"analysis setting 'roi_mode' must be one of {[m.value for m in RoiMode]}, got {self.roi_mode!r}"
            ) from error
        spacing = tuple(self.working_spacing_mm) if isinstance(self.working_spacing_mm, list | tuple) else ()
        numbers = all(isinstance(s, int | float) and not isinstance(s, bool) and s > 0 for s in spacing)
        if len(spacing) != 3 or not numbers:
            raise ValueError(
                f"analysis setting 'working_spacing_mm' must be three positive mm, got {self.working_spacing_mm!r}"
            )
        object.__setattr__(self, "working_spacing_mm", tuple(float(s) for s in spacing))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> AnalysisConfig:
        """Build from a config file section (``grading`` is a nested section); unknown keys are an error."""
        known = {"roi_mode", "grading", "working_spacing_mm"}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown analysis setting(s) {unknown}; known: {sorted(known)}")
        values = dict(mapping)
        if "grading" in values:
            values["grading"] = GradingConfig.from_mapping(values["grading"])
        return cls(**values)


def measure_series(
    series: CTSeries,
    liver: Backend | Volume,
    *,
    eligible: bool,
    reasons: Sequence[Finding],
    config: AnalysisConfig = AnalysisConfig(),
) -> AnalysisResult:
    """Measure and grade one CT series.

    Parameters
    ----------
    series
        the CT in HU on its source grid.
    liver
        a segmentation ``Backend`` (run on the working-grid CT), or a liver mask ``Volume``
        on any grid in the same frame of reference (``model`` is then ``USER_MASK``).
    eligible, reasons
        the header filter's verdict; an ineligible series is measured but not graded, and
        ``reasons`` lead the result's reasons.

    ``AnalysisResult.reasons`` holds why the grade was withheld (eligibility first, then the
    withholding findings); ``warnings`` holds everything noticed (reader and quality checks).

    Raises
    ------
    LiverfatError
        ``MASK_MISMATCH`` when a user mask is not binary or lies wholly outside the CT, or a
        backend returns a mask on another grid.
    """
    timings: dict[str, float] = {}
    with _timed(timings, "resample"):
        ct = to_working_grid(series.volume, config.working_spacing_mm)
    with _timed(timings, "segment"):
        mask, model = _segment(ct, liver)
    with _timed(timings, "rois"):
        placement = place_rois(mask, config.roi_mode)
    with _timed(timings, "measure"):
        measurement = measure(ct, mask, placement, config.grading.limits)
    with _timed(timings, "grade"):
        verdict, withheld = grade(measurement, config.grading)
    with _timed(timings, "masks"):
        source_masks = Masks(mask_to_source(mask, series.volume), mask_to_source(measurement.labels, series.volume))
    if not eligible:
        verdict = Grade.NOT_GRADED
    logger.info(
        "series %s: %s, graded on %s HU, %d warning(s)",
        series.series_uid,
        verdict.value,
        "n/a" if measurement.graded_hu is None else f"{measurement.graded_hu:.1f}",
        len(measurement.warnings),
    )
    return AnalysisResult(
        series_uid=series.series_uid,
        study_uid=series.study_uid,
        eligible=eligible,
        reasons=(*reasons, *withheld),
        grade=verdict,
        threshold_hu=config.grading.threshold_hu,
        parenchymal_hu=measurement.parenchymal_hu,
        volumetric_hu=measurement.volumetric_hu,
        axial_hu=measurement.axial_hu,
        liver_volume_ml=measurement.liver_volume_ml,
        rois=measurement.rois,
        warnings=(*series.warnings, *measurement.warnings),
        model=model,
        software_version=__version__,
        timings_s=timings,
        graded_hu=measurement.graded_hu,
        grade_basis=grade_basis(measurement),
        borderline=verdict is not Grade.NOT_GRADED and is_borderline(measurement.graded_hu, config.grading),
        borderline_margin_hu=config.grading.borderline_margin_hu,
        working_masks=Masks(mask, measurement.labels),
        source_masks=source_masks,
    )


def _segment(ct: Volume, liver: Backend | Volume) -> tuple[Volume, ModelInfo]:
    """The liver mask (bool) on the working grid, and where it came from."""
    if isinstance(liver, Volume):
        return _user_mask(ct, liver), USER_MASK
    predicted = liver.predict(ct)
    if not predicted.same_grid(ct):
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"backend {liver.info.name} returned a mask of shape {predicted.array.shape} that is not on the "
            f"working grid {ct.array.shape} at {ct.spacing} mm",
        )
    return predicted.with_array(np.asarray(predicted.array, dtype=bool)), liver.info


def _user_mask(ct: Volume, mask: Volume) -> Volume:
    box = nonzero_box(mask.array)
    crop = mask.array[box] if box is not None else mask.array[:0]
    values = np.unique(crop[crop != 0])
    if values.size > 1:
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"the liver mask holds labels {values[:10].tolist()}, expected one (a binary liver mask)",
        )
    working = mask_to_grid(mask.with_array(mask.array != 0), ct)
    if values.size and not working.array.any():
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"none of the liver mask's {int(np.count_nonzero(mask.array))} voxels lies within the CT's extent: "
            "mask and CT must share a frame of reference",
        )
    return working


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - start
