"""Liver attenuation on the working grid, and the quality checks the seed lacks (pure numpy).

Figures (all in HU, on the linearly resampled 0.7 x 0.7 x 2.5 mm CT, as the seed measures):

- DL-parenchymal: mean over all ROI voxels of the three slices pooled (the seed's figure);
- DL-volumetric: mean over the whole liver mask;
- DL-axial: mean over the liver mask on the largest liver slice.

Checks, each a warning ``Finding`` (grading decides which ones withhold the grade):

- ``NO_LIVER``: the mask is empty.
- ``ROI_OUTSIDE_LIVER``: the seed never clips its circle to the mask; an ROI with fewer
  than ``min_inside_liver_fraction`` of its voxels in the liver mixes in fat (-100 HU) or
  lung (-800 HU). At 0.95, 5 % of voxels in fat would already move the mean by ~8 HU.
- ``ROI_ON_VESSEL`` (or any non-parenchymal structure under the ROI), either of:
  * the ROI mean differs from the whole-liver mean by more than ``max_roi_deviation_hu``.
    Calibrated on the seed's 615 test scans (``Liver_attenuation_AI_vs_manual_ROI_n_615.csv``):
    DL-parenchymal minus DL-volumetric has SD 2.9 HU and |difference| > 10 HU in 3 scans
    (0.5 %), whose parenchymal values were 4-15 HU off the radiologists' manual ROI (those
    figures pool three ROIs; a single ROI, as checked here, spreads somewhat wider). An
    unenhanced vessel (blood 35-45 HU against liver 55-65 HU) covering a third of the circle
    shifts the mean by only ~6 HU, so this catches gross cases, not every small vessel.
  * more than ``max_outlier_fraction`` of ROI voxels lie more than ``outlier_hu`` from the
    liver median: enhanced vessel, calcification, air or fat. 60 HU is 3 noise SDs of a
    20 HU-noise chest CT, so noise alone puts ~0.3 % of voxels there, far below 5 %.

``LIVER_AT_EDGE`` and ``ROI_NOT_PLACED`` come from the placement (``inference.roi``), which
is where the slice choice is made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liverfat.dicom_io.errors import Finding, Reason
from liverfat.dicom_io.volume import Volume
from liverfat.inference.roi import RoiGeometry, RoiPlacement
from liverfat.result import RoiMeasurement

ENHANCEMENT_PERCENTILE = 98.0  # high percentile of liver HU: enhanced intrahepatic vessels (see grading)
_MM3_PER_ML = 1000.0


@dataclass(frozen=True)
class QualityLimits:
    """Thresholds of the ROI checks; the defaults live in ``grading.GradingConfig``."""

    min_inside_liver_fraction: float
    max_roi_deviation_hu: float
    outlier_hu: float
    max_outlier_fraction: float


@dataclass(frozen=True)
class LiverMeasurement:
    """What ``measure`` found; HU figures are None without liver or without ROIs."""

    rois: tuple[RoiMeasurement, ...]
    parenchymal_hu: float | None
    volumetric_hu: float | None
    axial_hu: float | None
    liver_volume_ml: float
    liver_median_hu: float | None
    liver_high_percentile_hu: float | None  # the ENHANCEMENT_PERCENTILE of liver voxels
    warnings: tuple[Finding, ...]


def measure(ct: Volume, liver: Volume, placement: RoiPlacement, limits: QualityLimits) -> LiverMeasurement:
    """Measure the ROIs and the liver mask on ``ct``'s grid (all three share one grid)."""
    if not (ct.same_grid(liver) and ct.same_grid(placement.labels)):
        raise ValueError("the CT, the liver mask and the ROI label map must share one grid")
    hu = ct.array
    mask = np.asarray(liver.array, dtype=bool)
    liver_hu = hu[mask].astype(np.float64)
    if liver_hu.size == 0:
        finding = Finding(Reason.NO_LIVER, "the liver mask is empty: no liver found in the scan range")
        return LiverMeasurement((), None, None, None, 0.0, None, None, (finding,))

    volumetric = float(liver_hu.mean())
    median, high = (float(v) for v in np.percentile(liver_hu, [50.0, ENHANCEMENT_PERCENTILE]))
    pixel_area_mm2 = ct.spacing[0] * ct.spacing[1]
    rois = []
    warnings = [*placement.warnings]
    for geometry in placement.rois:
        voxels = placement.labels.array == geometry.label
        values = hu[voxels].astype(np.float64)
        roi = _measure_roi(geometry, values, mask[voxels], pixel_area_mm2)
        rois.append(roi)
        warnings.extend(_check_roi(roi, values, volumetric, median, limits))

    in_rois = placement.labels.array > 0
    axial = None
    if placement.largest_slice is not None:
        k = placement.largest_slice
        axial = float(hu[k][mask[k]].mean(dtype=np.float64))
    return LiverMeasurement(
        rois=tuple(rois),
        parenchymal_hu=float(hu[in_rois].mean(dtype=np.float64)) if in_rois.any() else None,
        volumetric_hu=volumetric,
        axial_hu=axial,
        liver_volume_ml=liver_hu.size * float(np.prod(ct.spacing)) / _MM3_PER_ML,
        liver_median_hu=median,
        liver_high_percentile_hu=high,
        warnings=tuple(warnings),
    )


def _measure_roi(
    geometry: RoiGeometry, values: np.ndarray, in_liver: np.ndarray, pixel_area_mm2: float
) -> RoiMeasurement:
    return RoiMeasurement(
        label=geometry.label,
        slice_index=geometry.slice_index,
        z_mm=geometry.centre_lps[2],
        centre_lps=geometry.centre_lps,
        radius_mm=geometry.radius_mm,
        area_mm2=values.size * pixel_area_mm2,
        n_voxels=int(values.size),
        mean_hu=float(values.mean()),
        sd_hu=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        inside_liver_fraction=float(in_liver.mean()),
    )


def _check_roi(
    roi: RoiMeasurement, values: np.ndarray, liver_mean: float, liver_median: float, limits: QualityLimits
) -> list[Finding]:
    findings = []
    name = f"ROI {roi.label} (slice {roi.slice_index})"
    if roi.inside_liver_fraction < limits.min_inside_liver_fraction:
        findings.append(
            Finding(
                Reason.ROI_OUTSIDE_LIVER,
                f"{name}: {roi.inside_liver_fraction:.1%} of its voxels lie in the liver mask, "
                f"expected at least {limits.min_inside_liver_fraction:.0%}",
            )
        )
    deviation = roi.mean_hu - liver_mean
    if abs(deviation) > limits.max_roi_deviation_hu:
        findings.append(
            Finding(
                Reason.ROI_ON_VESSEL,
                f"{name}: mean {roi.mean_hu:.1f} HU differs from the whole-liver mean {liver_mean:.1f} HU by "
                f"{deviation:+.1f} HU, more than {limits.max_roi_deviation_hu:g} HU "
                "(vessel, lesion or non-liver tissue)",
            )
        )
    outliers = float(np.mean(np.abs(values - liver_median) > limits.outlier_hu))
    if outliers > limits.max_outlier_fraction:
        findings.append(
            Finding(
                Reason.ROI_ON_VESSEL,
                f"{name}: {outliers:.1%} of its voxels lie more than {limits.outlier_hu:g} HU from the liver median "
                f"{liver_median:.1f} HU, expected at most {limits.max_outlier_fraction:.0%} "
                "(enhanced vessel, calcification, air or fat)",
            )
        )
    return findings
