"""``liverfat analyze`` for research users: results.csv and resume, case folders, preview.png, --save-ct, progress."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from liverfat.analysis import AnalysisOptions
from liverfat.dicom_io.keyimage import MIN_WIDTH_PX
from liverfat.dicom_io.read import discover, load_series
from liverfat.dicom_io.seg import LIVER_RGB
from liverfat.inference.backend import Backend
from liverfat.service.cli import main
from liverfat.service.progress import ConsoleProgress
from liverfat.service.research import (
    CSV_COLUMNS,
    IDENTIFIER_COLUMNS,
    ResearchRun,
    analyze_inputs,
    settings_fingerprint,
)
from tests.phantom import Grid, Phantom, SeriesHeader, render_volume, write_series
from tests.service.fake_backend import PhantomLiverBackend

GRID = Grid(rows=128, columns=128, pixel_spacing_mm=2.8)
FATTY = Phantom().with_liver_hu(34.0)


def rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open(newline="") as file:
        return {row["folder"]: row for row in csv.DictReader(file)}


def no_model() -> Backend:
    raise AssertionError("the model must not be loaded: every case is current")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("research")
    _, liver = render_volume(FATTY, GRID)
    sitk.WriteImage(liver.with_array(liver.array.astype("uint8")).to_sitk(), str(root / "liver.nii.gz"))
    return {
        "fatty": write_series(root / "fatty", FATTY, GRID, SeriesHeader(series_uid="1.2.3.1"))[0].parent,
        "normal": write_series(root / "normal", Phantom(), GRID, SeriesHeader(series_uid="1.2.3.2"))[0].parent,
        "mask": root / "liver.nii.gz",
    }


def analyze(*args: str | Path) -> int:
    return main(["analyze", *map(str, args), "--no-dicom"])


# --- results.csv ------------------------------------------------------------------------------------
def test_results_csv_names_source_identifiers_series_model_grade_and_reasons(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    assert analyze(inputs["fatty"], "--out", tmp_path, "--mask", inputs["mask"]) == 0

    with (tmp_path / "results.csv").open(newline="") as file:
        assert tuple(csv.DictReader(file).fieldnames or ()) == CSV_COLUMNS
    row = rows(tmp_path)["1.2.3.1"]
    assert row["source"] == str(inputs["fatty"])
    assert (row["patient_id"], row["accession_number"], row["study_date"]) == ("PHANTOM-001", "ACC0001", "20240102")
    assert (row["series_description"], row["slice_thickness_mm"]) == ("AXIAL 2.5 SOFT TISSUE", "2.5")
    assert (row["status"], row["grade"], row["borderline"], row["model"]) == (
        "processed", "moderate-to-severe", "False", "user-mask")  # fmt: skip
    assert abs(float(row["graded_hu"]) - 34.0) < 2.0 and row["reasons"] == ""


def test_no_identifiers_leaves_patient_id_accession_and_study_date_out(inputs: dict[str, Path], tmp_path: Path) -> None:
    assert analyze(inputs["fatty"], "--out", tmp_path, "--mask", inputs["mask"], "--no-identifiers") == 0

    text = (tmp_path / "results.csv").read_text()
    header = text.splitlines()[0].split(",")
    assert header == [c for c in CSV_COLUMNS if c not in IDENTIFIER_COLUMNS]
    assert "PHANTOM-001" not in text and "ACC0001" not in text


def test_a_rerun_keeps_earlier_rows_and_skips_cases_whose_result_is_current(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mask = ("--mask", inputs["mask"])
    assert analyze(inputs["fatty"], "--out", tmp_path, *mask) == 0
    first = rows(tmp_path)["1.2.3.1"]
    result_json = tmp_path / "1.2.3.1" / "result.json"
    written = result_json.stat().st_mtime_ns
    assert analyze(inputs["normal"], "--out", tmp_path, *mask) == 0  # another series into the same --out
    capsys.readouterr()

    assert analyze(inputs["fatty"], inputs["normal"], "--out", tmp_path, *mask) == 0

    out = capsys.readouterr().out
    assert "series 1/2 1.2.3.1: up to date (processed, moderate-to-severe graded on" in out
    assert "series 2/2 1.2.3.2: up to date (processed, none-or-mild" in out
    assert set(rows(tmp_path)) == {"1.2.3.1", "1.2.3.2"}
    assert rows(tmp_path)["1.2.3.1"] == first and result_json.stat().st_mtime_ns == written


def test_force_a_changed_input_or_changed_settings_redo_a_case(inputs: dict[str, Path], tmp_path: Path) -> None:
    series = tmp_path / "fatty"
    series.mkdir()
    for path in inputs["fatty"].iterdir():
        (series / path.name).write_bytes(path.read_bytes())
    base = (series, "--out", tmp_path / "out", "--mask", inputs["mask"])
    result_json = tmp_path / "out" / "1.2.3.1" / "result.json"

    def redone(*extra: str | Path) -> bool:
        before = result_json.stat().st_mtime_ns if result_json.exists() else None
        assert analyze(*base, *extra) == 0
        return result_json.stat().st_mtime_ns != before

    assert redone()
    assert not redone()
    assert redone("--force")
    one_file = min(series.iterdir())
    os.utime(one_file, ns=(one_file.stat().st_atime_ns, one_file.stat().st_mtime_ns + 10**9))
    assert redone()  # the input changed
    assert redone("--threshold-hu", "45")  # the settings changed
    assert rows(tmp_path / "out")["1.2.3.1"]["threshold_hu"] == "45.0"


def test_a_resumed_run_never_loads_the_model(inputs: dict[str, Path], tmp_path: Path) -> None:
    run = ResearchRun(AnalysisOptions(out_dir=tmp_path, write_dicom=False))
    (first,) = analyze_inputs([inputs["normal"]], run, PhantomLiverBackend).cases
    assert first.report is not None and first.status == "processed"

    (again,) = analyze_inputs([inputs["normal"]], run, no_model).cases
    assert again.report is None and again.row == first.row


def test_the_model_and_its_precision_are_settings_but_not_with_a_mask_of_ones_own(tmp_path: Path) -> None:
    options = AnalysisOptions(out_dir=tmp_path)
    fp32, bf16 = (settings_fingerprint(ResearchRun(options, precision=p)) for p in ("fp32", "bf16"))
    assert fp32 != bf16
    assert settings_fingerprint(ResearchRun(options, model="other")) != settings_fingerprint(ResearchRun(options))
    masked = replace(options, mask=tmp_path)
    assert settings_fingerprint(ResearchRun(masked, precision="fp32")) == settings_fingerprint(
        ResearchRun(masked, precision="bf16"))


def test_the_settings_fingerprint_is_the_same_in_every_process() -> None:
    """Sets in the configuration (grading's withholding reasons) iterate in an order that follows the
    per-process string hash: a fingerprint built from their repr made every new run redo every case."""
    script = (
        "from pathlib import Path; from liverfat.analysis import AnalysisOptions; "
        "from liverfat.service.config import load_config; "
        "from liverfat.service.research import ResearchRun, settings_fingerprint; node = load_config(); "
        "print(settings_fingerprint(ResearchRun(AnalysisOptions(Path('out'), policy=node.eligibility, "
        "config=node.analysis))))"
    )
    prints = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(prints) == 1


# --- case folders -----------------------------------------------------------------------------------
def test_two_nifti_files_with_one_name_get_two_stable_folders(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ct, _ = render_volume(FATTY, GRID)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        sitk.WriteImage(ct.to_sitk(), str(tmp_path / name / "ct.nii.gz"))
    args = (
        tmp_path / "a" / "ct.nii.gz",
        tmp_path / "b" / "ct.nii.gz",
        "--out",
        tmp_path / "out",
        "--mask",
        inputs["mask"],
    )

    assert analyze(*args) == 0
    folders = rows(tmp_path / "out")
    assert len(folders) == 2 and all(name.startswith("ct-") for name in folders)
    assert {row["source"] for row in folders.values()} == {str(tmp_path / n / "ct.nii.gz") for n in ("a", "b")}
    assert all((tmp_path / "out" / name / "result.json").is_file() for name in folders)
    capsys.readouterr()
    assert analyze(*args) == 0
    assert capsys.readouterr().out.count(": up to date (processed") == 2  # same names again: resumed


# --- preview.png and --save-ct ----------------------------------------------------------------------
def test_preview_png_shows_the_same_key_image_for_a_dicom_series_and_its_nifti(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """The NIfTI is stored right-to-left and anterior-to-posterior (RAS): its preview is turned to DICOM axial."""
    ct, _ = render_volume(FATTY, GRID)
    sitk.WriteImage(sitk.DICOMOrient(ct.to_sitk(), "RAS"), str(tmp_path / "fatty.nii.gz"))
    run = ResearchRun(AnalysisOptions(out_dir=tmp_path / "out", write_dicom=False, write_preview=True))

    dicom, nifti = analyze_inputs([inputs["fatty"], tmp_path / "fatty.nii.gz"], run, PhantomLiverBackend).reports

    images = []
    for report in (dicom, nifti):
        path = report.files[0].parent / "preview.png"
        assert path in report.files
        with Image.open(path) as image:
            assert (image.format, image.mode) == ("PNG", "RGB")
            width, height = image.size
            images.append(np.asarray(image))
        scale = MIN_WIDTH_PX // GRID.columns  # 128 columns enlarged x4
        assert width == GRID.columns * scale and height > GRID.rows * scale  # the slice, then the text panel
    slices = [image[: GRID.rows * 4] for image in images]
    assert np.all(slices[0] == LIVER_RGB, axis=-1).sum() > 500  # the liver outline is drawn
    assert np.abs(slices[0].astype(int) - slices[1].astype(int)).mean() < 1.0  # same slice, same orientation


def test_save_ct_writes_the_dicom_series_as_nifti_on_its_geometry(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Feet-first storage order, so dicom2nifti's reorientation to LAS has work to do."""
    feet_first = Grid(
        rows=128, columns=128, pixel_spacing_mm=2.8, slice_positions_mm=tuple(np.arange(75.0, -75.1, -2.5))
    )
    folder = write_series(tmp_path / "ct", FATTY, feet_first, SeriesHeader(series_uid="1.2.3.9"),
                          shuffle_instance_numbers=False)[0].parent  # fmt: skip
    assert analyze(folder, "--out", tmp_path / "out", "--mask", inputs["mask"], "--save-ct") == 0

    image = sitk.ReadImage(str(tmp_path / "out" / "1.2.3.9" / "ct.nii.gz"))
    saved = sitk.GetArrayFromImage(image)
    series = load_series(discover([folder]).series[0]).volume
    assert image.GetSize() == series.size
    ijk = np.random.default_rng(0).integers(0, series.size, size=(300, 3))
    for (i, j, k), lps in zip(ijk, series.to_lps(ijk)):
        x, y, z = image.TransformPhysicalPointToIndex(tuple(float(v) for v in lps))
        assert saved[z, y, x] == series.array[k, j, i]


def test_save_ct_refuses_a_series_whose_instance_numbers_do_not_follow_its_slices(
    inputs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dicom2nifti orders slices by Instance Number; the phantom's are shuffled, which our reader ignores."""
    assert analyze(inputs["fatty"], "--out", tmp_path, "--mask", inputs["mask"], "--save-ct") == 0

    assert not (tmp_path / "1.2.3.1" / "ct.nii.gz").exists()
    assert "CT not saved as NIfTI" in caplog.text and "(0020,0013) 'Instance Number'" in caplog.text
    assert rows(tmp_path)["1.2.3.1"]["status"] == "processed"  # the measurement does not depend on it


# --- progress ---------------------------------------------------------------------------------------
def test_piped_output_has_a_start_line_and_a_summary_line_per_series(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert analyze(inputs["fatty"], inputs["normal"], "--out", tmp_path, "--mask", inputs["mask"]) == 0

    captured = capsys.readouterr()
    assert f"series 1/2: {inputs['fatty']} (1.2.3.1)" in captured.err.splitlines()
    assert f"series 2/2: {inputs['normal']} (1.2.3.2)" in captured.err.splitlines()
    summaries = captured.out.splitlines()
    assert len(summaries) == 2
    assert summaries[0].startswith("series 1/2 1.2.3.1: processed, moderate-to-severe DL-parenchymal")
    assert summaries[1].startswith("series 2/2 1.2.3.2: processed, none-or-mild")


def test_on_a_terminal_a_bar_counts_series_against_the_total(inputs: dict[str, Path], tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    run = ResearchRun(AnalysisOptions(out_dir=tmp_path, write_dicom=False, mask=inputs["mask"]))

    analyze_inputs([inputs["fatty"], inputs["normal"]], run, no_model, ConsoleProgress(bar=True, out=out, err=err))

    assert "series 2/2" in err.getvalue() and "100%" in err.getvalue() and "2/2 [" in err.getvalue()
    assert [line.split(":")[0] for line in out.getvalue().splitlines()] == ["series 1/2 1.2.3.1", "series 2/2 1.2.3.2"]
