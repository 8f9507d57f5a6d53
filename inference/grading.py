"""The steatosis grade from the DL-parenchymal attenuation, and when to withhold it.

Moderate-to-severe steatosis is DL-parenchymal attenuation strictly below ``threshold_hu``
(40 HU): the seed's released data flags ``manual_hs`` exactly when the manual ROI is < 40 HU
(0 mismatches in 615 scans), so 40.0 HU itself is not steatotic.

The grade is withheld (``Grade.NOT_GRADED`` with reasons) when a measurement warning whose
code is in ``withhold_on`` was raised (by default: no liver, an ROI not placed, outside the
liver or on a vessel), or when the image suggests contrast (``IMAGE_SUGGESTS_CONTRAST``).
The method is only valid on unenhanced CT, and the header filter cannot see contrast that the
headers do not declare (3D-IRCADb patient 1 is a portal venous scan). The image rule:

- the liver median is above ``contrast_suspicion_hu`` (85 HU). Unenhanced liver is 40-70 HU
  (normal mean 55-60); the highest manual ROI among the seed's 1,014 unenhanced chest CTs is
  79.8 HU (99th percentile 74.9 HU, ``Liver_attenuation_ROI_vs_seg_all_manual_n_1014.csv``).
  Portal venous liver is 100-130 HU (3D-IRCADb patient 1: median 112 HU). Iron overload or
  amiodarone (75-90 HU) may cross 85 HU and lose its grade, which errs on the safe side:
  such a liver is not steatotic, so no steatosis is missed, only a "none-or-mild" withheld.
- or the liver's 98th percentile is above ``enhanced_vessel_hu`` (150 HU): enhanced
  intrahepatic vessels, which catch a fatty liver that enhancement lifted to 60-85 HU.
  Unenhanced blood is 35-55 HU, so an unenhanced liver reaches 150 HU at its 98th percentile
  only with noise SD above ~45 HU; 3D-IRCADb patient 1 has 3.9 % of its manually segmented
  liver voxels above 150 HU. An arterial-phase scan with little portal enhancement can pass
  both rules; the header filter remains the first line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from liverfat.errors import Finding, Reason
from liverfat.inference.attenuation import ENHANCEMENT_PERCENTILE, LiverMeasurement, QualityLimits
from liverfat.result import Grade, RoiRule

DEFAULT_WITHHOLD_ON = frozenset(
    {Reason.NO_LIVER, Reason.ROI_NOT_PLACED, Reason.ROI_OUTSIDE_LIVER, Reason.ROI_ON_VESSEL}
)

_HU_SETTINGS = (
    "threshold_hu", "max_roi_deviation_hu", "outlier_hu", "contrast_suspicion_hu", "enhanced_vessel_hu",
    "borderline_margin_hu",
)  # fmt: skip
_FRACTION_SETTINGS = ("min_inside_liver_fraction", "max_outlier_fraction")


@dataclass(frozen=True)
class GradingConfig:
    """Grading threshold and the limits of the quality checks (see the module docstring)."""

    threshold_hu: float = 40.0  # moderate-to-severe when DL-parenchymal < threshold (strict)
    min_inside_liver_fraction: float = 0.95
    max_roi_deviation_hu: float = 11.4  # 99th percentile, see attenuation's module docstring
    outlier_hu: float = 60.0
    max_outlier_fraction: float = 0.05
    max_roi_sd_ratio: float = 1.5  # ROI SD over the parenchyma's robust spread, see attenuation
    contrast_suspicion_hu: float = 85.0
    enhanced_vessel_hu: float = 150.0
    # A graded value closer than this to the threshold is flagged borderline: the seed's
    # DL-parenchymal differed from the radiologists' manual ROI by 2.41 HU on average (615 scans).
    borderline_margin_hu: float = 2.41
    withhold_on: frozenset[Reason] = field(default_factory=lambda: DEFAULT_WITHHOLD_ON)

    def __post_init__(self) -> None:
        for name in _HU_SETTINGS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"grading setting {name!r} must be a number of HU, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in _FRACTION_SETTINGS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"grading setting {name!r} must be a fraction between 0 and 1, got {value!r}")
            object.__setattr__(self, name, float(value))
        ratio = self.max_roi_sd_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio <= 0:
            raise ValueError(f"grading setting 'max_roi_sd_ratio' must be a positive number, got {ratio!r}")
        object.__setattr__(self, "max_roi_sd_ratio", float(ratio))
        try:
            withhold_on = frozenset(Reason(code) for code in self.withhold_on)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"grading setting 'withhold_on' must list reason codes from {sorted(r.value for r in Reason)}, "
                f"got {self.withhold_on!r}"
            ) from error
        object.__setattr__(self, "withhold_on", withhold_on)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> GradingConfig:
        """Build from a config file section; unknown keys are an error, not a silent default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"unknown grading setting(s) {unknown}; known: {sorted(known)}")
        values = dict(mapping)
        if "withhold_on" in values:
            codes = values["withhold_on"]
            if not isinstance(codes, list | tuple | set | frozenset):
                raise ValueError(f"grading setting 'withhold_on' must be a list of codes, got {codes!r}")
            values["withhold_on"] = frozenset(codes)
        return cls(**values)

    @property
    def limits(self) -> QualityLimits:
        return QualityLimits(
            min_inside_liver_fraction=self.min_inside_liver_fraction,
            max_roi_deviation_hu=self.max_roi_deviation_hu,
            outlier_hu=self.outlier_hu,
            max_outlier_fraction=self.max_outlier_fraction,
            max_roi_sd_ratio=self.max_roi_sd_ratio,
        )


def grade(measurement: LiverMeasurement, config: GradingConfig) -> tuple[Grade, tuple[Finding, ...]]:
    """The grade and, when it is ``NOT_GRADED``, the reasons it was withheld."""
    reasons = [warning for warning in measurement.warnings if warning.code in config.withhold_on]
    reasons.extend(_contrast_findings(measurement, config))
    if measurement.graded_hu is None and not reasons:
        reasons.append(Finding(Reason.ROI_NOT_PLACED, "no ROI could be measured"))
    if reasons or measurement.graded_hu is None:
        return Grade.NOT_GRADED, tuple(reasons)
    if measurement.graded_hu < config.threshold_hu:
        return Grade.MODERATE_TO_SEVERE, ()
    return Grade.NONE_OR_MILD, ()


def grade_basis(measurement: LiverMeasurement) -> str:
    """Which value the grade rests on, and why, in words ("" without ROIs)."""
    if measurement.graded_hu is None:
        return ""
    replaced = [roi for roi in measurement.rois if roi.rule is not RoiRule.SEED]
    if not replaced:
        return "DL-parenchymal of the seed's three ROIs"
    which = ", ".join(f"ROI {roi.label} ({roi.rule.value}, slice {roi.slice_index})" for roi in replaced)
    seed = "n/a" if measurement.parenchymal_hu is None else f"{measurement.parenchymal_hu:.1f} HU"
    return (
        f"DL-parenchymal with {which} replacing seed ROIs that failed their checks "
        f"(vessel, lesion or outside the liver); the seed's own three ROIs read {seed}"
    )


def is_borderline(value_hu: float | None, config: GradingConfig) -> bool:
    """Whether ``value_hu`` lies within ``borderline_margin_hu`` of the threshold (either side)."""
    return value_hu is not None and abs(value_hu - config.threshold_hu) < config.borderline_margin_hu


def _contrast_findings(measurement: LiverMeasurement, config: GradingConfig) -> list[Finding]:
    findings = []
    median, high = measurement.liver_median_hu, measurement.liver_high_percentile_hu
    if median is not None and median > config.contrast_suspicion_hu:
        findings.append(
            Finding(
                Reason.IMAGE_SUGGESTS_CONTRAST,
                f"liver median {median:.1f} HU exceeds {config.contrast_suspicion_hu:g} HU: unenhanced liver is "
                "40-70 HU, portal venous phase 100-130 HU",
            )
        )
    elif high is not None and high > config.enhanced_vessel_hu:
        findings.append(
            Finding(
                Reason.IMAGE_SUGGESTS_CONTRAST,
                f"the liver's {ENHANCEMENT_PERCENTILE:g}th percentile {high:.0f} HU exceeds "
                f"{config.enhanced_vessel_hu:g} HU: enhanced intrahepatic vessels",
            )
        )
    return findings
