"""``liverfat check`` and ``liverfat analyze`` from the command line, on phantom series."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from liverfat.service.cli import build_parser, main
from liverfat.volume import Volume
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


def test_analyze_ignore_eligibility_processes_an_ineligible_series_and_keeps_its_reasons(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["analyze", str(inputs["contrast"]), "--out", str(out), "--mask", str(inputs["mask"]),
            "--ignore-eligibility", "--no-dicom", "--save-mask"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "1.2.3.3" / "result.json").read_text())
    assert result["status"] == "processed" and result["eligible"] is False
    assert [r["code"] for r in result["reasons"]] == ["contrast"]
    assert (out / "1.2.3.3" / "liver_mask.nii.gz").is_file()


def test_analyze_prints_the_specific_reason_of_each_bad_input_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("patient list\n")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "photo.png")
    bad = {"missing": "missing: no such file or folder [not_found]", "empty": "empty: empty folder [empty_folder]",
           "notes.txt": "notes.txt: not a DICOM file but a text file [not_dicom]",
           "photo.png": "photo.png: not a DICOM file but a PNG image [not_dicom]"}  # fmt: skip
    for name, reason in bad.items():
        assert main(["analyze", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert reason in err and "no CT series found" in err


def test_check_exits_non_zero_on_a_missing_path_and_names_it(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(inputs["fatty"]), str(tmp_path / "missing")]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    missing = [line for line in lines if line.get("file") == str(tmp_path / "missing")]
    assert missing[0]["reasons"][0]["code"] == "not_found"
    assert any(line["series_uid"] == "1.2.3.1" for line in lines)  # the good input is still checked


def test_analyze_with_a_misaligned_mask_says_it_does_not_match_the_ct_and_exits_non_zero(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fatty phantom's liver moved 10 cm posterior, half out of the body: no ROI or contrast talk."""
    _, liver = render_volume(Phantom(), GRID)
    origin = np.asarray(liver.origin) + np.array([0.0, 100.0, 0.0])
    moved = Volume(liver.array.astype("uint8"), liver.spacing, tuple(origin), liver.direction)
    sitk.WriteImage(moved.to_sitk(), str(tmp_path / "moved.nii.gz"))
    out = tmp_path / "out"
    args = ["analyze", str(inputs["fatty"]), "--out", str(out), "--mask", str(tmp_path / "moved.nii.gz"), "--no-dicom"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "mask does not match the CT" in captured.out and "mask_mismatch" in captured.err
    (row,) = csv.DictReader((out / "results.csv").open())
    assert (row["status"], row["reasons"]) == ("rejected", "mask_mismatch")


def test_mask_label_names_the_liver_in_a_multi_label_mask(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hu, liver = render_volume(Phantom(), GRID)
    labels = np.where(liver.array, 5, np.where(hu.array > -500, 1, 0)).astype("uint8")  # 1 body, 5 liver
    sitk.WriteImage(liver.with_array(labels).to_sitk(), str(tmp_path / "labels.nii.gz"))
    args = ["analyze", str(inputs["fatty"]), "--mask", str(tmp_path / "labels.nii.gz"), "--no-dicom"]

    assert main([*args, "--out", str(tmp_path / "unnamed")]) == 1
    assert "name the liver label with --mask-label N" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "named"), "--mask-label", "5"]) == 0
    (row,) = csv.DictReader((tmp_path / "named" / "results.csv").open())
    assert row["grade"] == "moderate-to-severe" and abs(float(row["graded_hu"]) - 34.0) < 2.0


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
