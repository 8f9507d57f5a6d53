from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from liverfat.errors import Finding, Reason
from liverfat.inference.attenuation import LiverMeasurement
from liverfat.inference.grading import DEFAULT_WITHHOLD_ON, GradingConfig, grade, grade_basis, is_borderline
from liverfat.result import Grade, RoiMeasurement, RoiRule
from liverfat.volume import Volume

CONFIG = GradingConfig()


def measurement(parenchymal_hu: float | None = 55.0, *, median_hu: float = 55.0, high_hu: float = 90.0,
                warnings: tuple[Finding, ...] = ()) -> LiverMeasurement:
    return LiverMeasurement(
        rois=(),
        labels=Volume(np.zeros((3, 4, 4), dtype=np.uint8), (0.7, 0.7, 2.5), (0.0, 0.0, 0.0)),
        parenchymal_hu=parenchymal_hu,
        graded_hu=parenchymal_hu,
        volumetric_hu=median_hu,
        axial_hu=median_hu,
        liver_volume_ml=1500.0,
        reference_hu=median_hu,
        liver_median_hu=median_hu,
        liver_high_percentile_hu=high_hu,
        warnings=warnings,
    )


@pytest.mark.parametrize(
    ("parenchymal_hu", "expected"),
    [
        (39.9, Grade.MODERATE_TO_SEVERE),
        (40.0, Grade.NONE_OR_MILD),
        (12.0, Grade.MODERATE_TO_SEVERE),
        (62.0, Grade.NONE_OR_MILD),
    ],
)
def test_moderate_to_severe_is_strictly_below_40_hu(parenchymal_hu: float, expected: Grade) -> None:
    assert grade(measurement(parenchymal_hu, median_hu=parenchymal_hu), CONFIG) == (expected, ())


def test_threshold_comes_from_the_config() -> None:
    assert grade(measurement(42.0), GradingConfig(threshold_hu=45.0))[0] is Grade.MODERATE_TO_SEVERE


@pytest.mark.parametrize("code", sorted(DEFAULT_WITHHOLD_ON))
def test_failed_roi_check_withholds_the_grade_with_its_reason(code: Reason) -> None:
    finding = Finding(code, "what was seen")
    assert grade(measurement(30.0, warnings=(finding,)), CONFIG) == (Grade.NOT_GRADED, (finding,))


def test_liver_at_edge_alone_does_not_withhold_the_grade() -> None:
    warning = Finding(Reason.LIVER_AT_EDGE, "largest slice at the edge")
    assert grade(measurement(30.0, warnings=(warning,)), CONFIG) == (Grade.MODERATE_TO_SEVERE, ())


def test_withholding_codes_are_configurable() -> None:
    config = GradingConfig(withhold_on=frozenset({Reason.LIVER_AT_EDGE}))
    warning = Finding(Reason.LIVER_AT_EDGE, "largest slice at the edge")
    assert grade(measurement(30.0, warnings=(warning,)), config)[0] is Grade.NOT_GRADED
    vessel = Finding(Reason.ROI_ON_VESSEL, "vessel")
    assert grade(measurement(30.0, warnings=(vessel,)), config)[0] is Grade.MODERATE_TO_SEVERE


def test_portal_venous_liver_suggests_contrast() -> None:
    verdict, reasons = grade(measurement(110.0, median_hu=110.0, high_hu=170.0), CONFIG)
    assert verdict is Grade.NOT_GRADED
    assert [r.code for r in reasons] == [Reason.IMAGE_SUGGESTS_CONTRAST]
    assert "110.0 HU" in reasons[0].message


def test_enhanced_vessels_in_a_fatty_enhanced_liver_suggest_contrast() -> None:
    verdict, reasons = grade(measurement(70.0, median_hu=72.0, high_hu=160.0), CONFIG)
    assert verdict is Grade.NOT_GRADED and [r.code for r in reasons] == [Reason.IMAGE_SUGGESTS_CONTRAST]


def test_dense_unenhanced_liver_below_85_hu_is_still_graded() -> None:
    assert grade(measurement(80.0, median_hu=80.0, high_hu=125.0), CONFIG) == (Grade.NONE_OR_MILD, ())


def test_no_roi_and_no_explanation_is_not_graded() -> None:
    verdict, reasons = grade(measurement(None), CONFIG)
    assert verdict is Grade.NOT_GRADED and [r.code for r in reasons] == [Reason.ROI_NOT_PLACED]


def test_from_mapping_reads_numbers_and_reason_codes() -> None:
    config = GradingConfig.from_mapping(
        {"threshold_hu": 42, "min_inside_liver_fraction": 0.9, "withhold_on": ["no_liver", "liver_at_edge"]}
    )
    assert config == replace(
        CONFIG, threshold_hu=42.0, min_inside_liver_fraction=0.9,
        withhold_on=frozenset({Reason.NO_LIVER, Reason.LIVER_AT_EDGE}),
    )
    assert isinstance(config.threshold_hu, float)
    assert config.limits.min_inside_liver_fraction == 0.9


def test_from_mapping_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown grading setting\(s\) \['threshold'\]"):
        GradingConfig.from_mapping({"threshold": 40.0})


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"threshold_hu": "40"}, "must be a number"),
        ({"threshold_hu": True}, "must be a number"),
        ({"min_inside_liver_fraction": 1.5}, "between 0 and 1"),
        ({"withhold_on": ["roi_on_artery"]}, "reason codes"),
        ({"withhold_on": "no_liver"}, "list of codes"),
        ({"withhold_on": 3}, "list of codes"),
    ],
)
def test_from_mapping_rejects_invalid_values(mapping: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradingConfig.from_mapping(mapping)


def test_grade_rests_on_the_graded_value_and_says_which_rois_were_replaced() -> None:
    roi = RoiMeasurement(label=2, slice_index=14, z_mm=0.0, centre_lps=(0.0, 0.0, 0.0), radius_mm=8.05,
                         area_mm2=196.0, n_voxels=401, mean_hu=55.0, sd_hu=10.0, inside_liver_fraction=1.0,
                         rule=RoiRule.NEXT_SLICE)  # fmt: skip
    replaced = replace(measurement(38.0), rois=(roi,), graded_hu=44.0)
    assert grade(replaced, CONFIG) == (Grade.NONE_OR_MILD, ())
    assert grade_basis(replaced) == (
        "DL-parenchymal with ROI 2 (next-slice, slice 14) replacing seed ROIs that failed their checks "
        "(vessel, lesion or outside the liver); the seed's own three ROIs read 38.0 HU"
    )
    assert grade_basis(measurement(50.0)) == "DL-parenchymal of the seed's three ROIs"
    assert grade_basis(measurement(None)) == ""


def test_borderline_is_within_the_margin_on_either_side() -> None:
    assert is_borderline(37.6, CONFIG) and is_borderline(42.4, CONFIG) and is_borderline(40.0, CONFIG)
    assert not is_borderline(37.5, CONFIG) and not is_borderline(42.5, CONFIG) and not is_borderline(None, CONFIG)
