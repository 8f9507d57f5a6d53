"""Reduced precision: which one is chosen where, and that bf16 gives the fp32 answer on real CTs.

The equivalence tests run the product's path (``liverfat.analysis``) once per precision on two real
cases, a tall chest CT (two segmentation passes) and the TotalSegmentator example; they skip on a
CPU without bf16 hardware, where ``auto`` runs fp32 and nothing differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from liverfat.analysis import AnalysisOptions, ModelCache, SeriesReport, analyze_dicom_series, analyze_nifti
from liverfat.dicom_io.read import discover
from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.default import DefaultBackend
from liverfat.inference.models.precision import Precision, native_bf16, resolve_precision
from liverfat.inference.models.registry import load_backend

CPU = torch.device("cpu")
MIN_DICE = 0.998
MAX_PARENCHYMAL_DIFFERENCE_HU = 0.3


def _without_bf16(_: torch.device) -> bool:
    return False


def _with_bf16(_: torch.device) -> bool:
    return True


@pytest.mark.parametrize("requested", ["auto", "AUTO", " auto "])
def test_auto_is_fp32_without_bf16_hardware(requested: str) -> None:
    assert resolve_precision(requested, CPU, has_native_bf16=_without_bf16) is Precision.FP32


def test_auto_is_bf16_with_bf16_hardware() -> None:
    assert resolve_precision("auto", CPU, has_native_bf16=_with_bf16) is Precision.BF16


def test_fp32_is_fp32_everywhere() -> None:
    assert resolve_precision("fp32", CPU, has_native_bf16=_with_bf16) is Precision.FP32


def test_bf16_without_bf16_hardware_is_refused_naming_the_instructions() -> None:
    with pytest.raises(LiverfatError, match="AVX512-BF16 or AMX-BF16.*'auto' or 'fp32'") as raised:
        resolve_precision("bf16", CPU, has_native_bf16=_without_bf16)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE


def test_an_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(LiverfatError, match="'int8'.*auto, fp32, bf16") as raised:
        resolve_precision("int8", CPU)
    assert raised.value.reason is Reason.BACKEND_UNAVAILABLE


def test_the_chosen_precision_is_in_the_model_info_and_its_version(default_weights: Path) -> None:
    info = load_backend("default", device="cpu", precision="fp32").info
    assert info.precision == "fp32"
    assert info.version.endswith(" fp32")
    assert info.to_json()["precision"] == "fp32"


@pytest.mark.skipif(not native_bf16(CPU), reason="this CPU has neither AVX512-BF16 nor AMX-BF16")
def test_auto_runs_bf16_on_this_cpu(default_weights: Path) -> None:
    info = DefaultBackend(device="cpu").info
    assert info.precision == "bf16" and info.version.endswith(" bf16")


# --------------------------------------------------------------------------------------------
# equivalence on real CTs


@pytest.fixture(scope="module")
def both(default_weights: Path) -> dict[Precision, ModelCache]:
    if not native_bf16(CPU):
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX-BF16: bf16 is not offered, auto runs fp32")
    return {p: ModelCache(lambda p=p: load_backend("default", device="cpu", precision=p)) for p in Precision}


def _assert_equivalent(reports: dict[Precision, SeriesReport]) -> None:
    reference, reduced = reports[Precision.FP32].result, reports[Precision.BF16].result
    assert reference.working_masks is not None and reduced.working_masks is not None
    a, b = reference.working_masks.liver.array.astype(bool), reduced.working_masks.liver.array.astype(bool)
    dice = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    assert dice >= MIN_DICE
    assert reference.parenchymal_hu is not None and reduced.parenchymal_hu is not None
    assert abs(reduced.parenchymal_hu - reference.parenchymal_hu) <= MAX_PARENCHYMAL_DIFFERENCE_HU
    assert reduced.grade is reference.grade
    assert reduced.model.precision == "bf16" and reference.model.precision == "fp32"


@pytest.mark.slow
@pytest.mark.shared_data
def test_bf16_gives_the_fp32_result_on_a_real_chest_ct(
    shared_data: Path, both: dict[Precision, ModelCache], tmp_path: Path
) -> None:
    (series,) = discover([shared_data / "chest-ct" / "lidc-idri-0002"]).series
    _assert_equivalent({
        p: analyze_dicom_series(series, AnalysisOptions(out_dir=tmp_path / p, write_dicom=False), models)
        for p, models in both.items()
    })  # fmt: skip


@pytest.mark.slow
@pytest.mark.shared_data
def test_bf16_gives_the_fp32_result_on_the_totalsegmentator_example(
    shared_data: Path, both: dict[Precision, ModelCache], tmp_path: Path
) -> None:
    ct = shared_data / "totalsegmentator-example" / "example_ct_sm.nii.gz"
    _assert_equivalent({
        p: analyze_nifti(ct, AnalysisOptions(out_dir=tmp_path / p, write_dicom=False), models)
        for p, models in both.items()
    })  # fmt: skip
