from __future__ import annotations

from dataclasses import replace

import pytest

from liverfat.result import AnalysisResult, Grade, ModelInfo

BASE = AnalysisResult(
    series_uid="1.2.3", study_uid="1.2", eligible=True, reasons=(), grade=Grade.NONE_OR_MILD, threshold_hu=40.0,
    parenchymal_hu=45.77, volumetric_hu=47.0, axial_hu=47.2, liver_volume_ml=1300.0, rois=(), warnings=(),
    model=ModelInfo(name="m", version="1"), software_version="0", graded_hu=45.77,
)  # fmt: skip


@pytest.mark.parametrize(
    ("graded_hu", "parenchymal_hu", "text"),
    [
        (45.77, 45.77, "DL-parenchymal 45.8 HU"),
        (51.35, 45.77, "graded on 51.4 HU (seed ROIs 45.8 HU)"),  # a seed ROI replaced: say which value counts
        (None, 45.77, "DL-parenchymal 45.8 HU"),
        (None, None, ""),
    ],
)
def test_value_text_names_the_value_the_grade_rests_on(
    graded_hu: float | None, parenchymal_hu: float | None, text: str
) -> None:
    assert replace(BASE, graded_hu=graded_hu, parenchymal_hu=parenchymal_hu).value_text() == text
