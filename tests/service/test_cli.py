"""``liverfat check`` and ``liverfat analyze`` from the command line, on phantom series."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from liverfat.service.cli import build_parser, main
from tests.phantom import Grid, Phantom, SeriesHeader, render_volume, write_series

GRID = Grid(rows=128, columns=128, pixel_spacing_mm=2.8)


def write_mask(path: Path, phantom: Phantom) -> Path:
    _, liver = render_volume(phantom, GRID)
    sitk.WriteImage(liver.with_array(liver.array.astype("uint8")).to_sitk(), str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    fatty = Phantom().with_liver_hu(34.0)
    normal = Phantom().with_liver_hu(58.0)
    paths = {
        "fatty": write_series(root / "fatty", fatty, GRID, SeriesHeader(series_uid="1.2.3.1"))[0].parent,
        "normal": write_series(root / "normal", normal, GRID, SeriesHeader(series_uid="1.2.3.2"))[0].parent,
        "contrast": write_series(
            root / "contrast", fatty, GRID, SeriesHeader(series_uid="1.2.3.3", study_description="CT CHEST W IV CONT")
        )[0].parent,
        "mask": write_mask(root / "liver.nii.gz", fatty),
    }
    (paths["fatty"] / "notes.txt").write_text("not a DICOM file")
    return paths


def test_check_prints_one_json_line_per_series_and_per_skipped_file(
    inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(inputs["fatty"]), str(inputs["contrast"])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_uid = {line["series_uid"]: line for line in lines}
    assert by_uid["1.2.3.1"]["eligible"] is True and by_uid["1.2.3.1"]["files"] == 61
    assert by_uid["1.2.3.3"]["eligible"] is False
    assert [r["code"] for r in by_uid["1.2.3.3"]["reasons"]] == ["contrast"]
    assert by_uid[None]["reasons"][0]["code"] == "not_dicom"


def test_check_reads_a_single_file(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    one_file = sorted(inputs["contrast"].glob("*.dcm"))[0]
    assert main(["check", str(one_file)]) == 0
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["files"] == 1 and line["eligible"] is False


def test_analyze_grades_both_sides_of_the_threshold_and_rejects_contrast(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["analyze", str(inputs["fatty"]), str(inputs["normal"]), str(inputs["contrast"]), "--out", str(out),
            "--mask", str(inputs["mask"]), "--no-dicom"]  # fmt: skip
    assert main(args) == 0
    rows = {row["series_uid"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert rows["1.2.3.1"]["grade"] == "moderate-to-severe"
    assert rows["1.2.3.2"]["grade"] == "none-or-mild"
    assert rows["1.2.3.3"]["status"] == "rejected" and rows["1.2.3.3"]["reasons"] == "contrast"
    result = json.loads((out / "1.2.3.1" / "result.json").read_text())
    assert abs(result["parenchymal_hu"] - 34.0) < 2.0
    assert [roi["n_voxels"] for roi in result["rois"]] == [401, 401, 401]
    assert result["model"]["name"] == "user-mask"
    for key in ("series_uid", "study_uid", "eligible", "reasons", "grade", "threshold_hu", "volumetric_hu", "axial_hu",
                "liver_volume_ml", "warnings", "software_version", "timings_s"):  # fmt: skip
        assert key in result
    assert json.loads((out / "skipped.json").read_text())[0]["reasons"][0]["code"] == "not_dicom"


def test_analyze_force_processes_an_ineligible_series_and_keeps_its_reasons(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["analyze", str(inputs["contrast"]), "--out", str(out), "--mask", str(inputs["mask"]), "--force",
            "--no-dicom", "--save-mask"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "1.2.3.3" / "result.json").read_text())
    assert result["status"] == "processed" and result["eligible"] is False
    assert [r["code"] for r in result["reasons"]] == ["contrast"]
    assert (out / "1.2.3.3" / "liver_mask.nii.gz").is_file()


def test_analyze_exits_non_zero_with_a_readable_message_when_no_series_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    assert "no CT series" in capsys.readouterr().err


def test_analyze_fails_clearly_when_the_model_cannot_be_loaded(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["analyze", str(inputs["fatty"]), "--out", str(out), "--model", str(tmp_path / "no-such-model")]
    assert main(args) == 1
    result = json.loads((out / "1.2.3.1" / "result.json").read_text())
    assert result["status"] == "failed"
    assert result["reasons"][-1]["code"] == "backend_unavailable"
    assert "no-such-model" in result["reasons"][-1]["message"]
    assert "1 of 1 series failed" in capsys.readouterr().err


def test_models_list_reads_the_store_in_the_configured_model_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``LIVERFAT_MODEL_CACHE`` is ``[model] cache``: the research commands build the node's configuration too."""
    model = tmp_path / "cache" / "nnunet" / "liver"
    model.mkdir(parents=True)
    (model / "dataset.json").write_text("{}")
    monkeypatch.setenv("LIVERFAT_MODEL_CACHE", str(tmp_path / "cache"))
    assert main(["models", "list"]) == 0
    assert f"liver\tnnU-Net v2 model in {model}" in capsys.readouterr().out.splitlines()


def test_analyze_accepts_any_cuda_device_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["analyze", "ct", "--out", "out", "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "ct", "--out", "out", "--device", "tpu"])
    assert "unknown device 'tpu'" in capsys.readouterr().err
