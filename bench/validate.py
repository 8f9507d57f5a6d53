"""Validation on real data: the product's own analysis, case by case, against the references that exist.

Every real chest CT in ``../shared/data/chest-ct/`` (each folder found there) and the labelled
cases of ``bench/accuracy.py`` (3D-IRCADb 1.1 with its manual liver mask, the TotalSegmentator
example with its label 5) go through the same orchestration as ``liverfat analyze``
(``liverfat.analysis``: header filter, loading, image checks, grading, with no DICOM
outputs written). Per case one row: status, grade or the reason codes why not, borderline flag,
DL-parenchymal (seed-exact), the graded value, DL-volumetric, DL-axial, the radiologist's manual
ROI value and the difference where the seed's CSVs hold one, Dice / HD95 / volume difference
against the reference mask where one exists, and the run time (loading + analysis; noisy on a
shared machine).

A chest CT folder's references are found by its name: the seed's mask
``seed-dl-parenchymal/<id>_3d_liver_seg.nii.gz`` and the ``manual_select_roi`` of the seed's
``Liver_attenuation_ROI_vs_seg_all_manual_n_1014.csv``, matching ids by letters and digits only
(``lidc-idri-0002`` = ``LIDC-IDRI_0002`` = ``LIDC_IDRI_0002``).

    .venv/bin/python bench/validate.py                          # plain table
    .venv/bin/python bench/validate.py --markdown --json rows.json
    .venv/bin/python bench/validate.py --model PATH             # another model (nnU-Net v2 folder or store name)
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Run as a script, Python puts bench/ on sys.path: the shared helpers come from accuracy.py.
from accuracy import CASES, SEED_FIGURES, SHARED_DATA, compare, load_ct

from liverfat.analysis import (
    AnalysisOptions,
    ModelCache,
    SeriesReport,
    analyze_dicom_series,
    analyze_nifti,
)
from liverfat.dicom_io.read import discover, read_mask
from liverfat.inference.backend import Backend
from liverfat.inference.models.registry import load_backend
from liverfat.inference.pipeline import measure_series
from liverfat.result import AnalysisResult, Grade

CHEST_CT = SHARED_DATA / "chest-ct"
SEED = SHARED_DATA / "seed-dl-parenchymal"
SEED_MASK_SUFFIX = "_3d_liver_seg.nii.gz"
MANUAL_CSV = SEED / "csv" / "Liver_attenuation_ROI_vs_seg_all_manual_n_1014.csv"
MANUAL_COLUMN = "manual_select_roi"  # the radiologist's ROI; the other columns are measured on the manual mask

# What a case should come out as, where the data says so.
EXPECTED = {SHARED_DATA / "3dircadb-1.1/PATIENT_DICOM": "not graded (contrast-enhanced)"}


@dataclass(frozen=True)
class ValidationCase:
    name: str
    ct: Path  # a DICOM series folder or a NIfTI file
    reference: Path | None = None  # a liver mask
    label: int | None = None  # the liver's value in a multi-label reference
    reference_kind: str = ""
    manual_hu: float | None = None  # the radiologist's manual ROI attenuation
    seed_figures: dict[str, float] = field(default_factory=dict)  # the seed CSV's row for this case
    expected: str = ""


def case_id(name: str) -> str:
    """An id reduced to upper-case letters and digits, so that folder names meet the CSVs' ids."""
    return re.sub(r"[^A-Z0-9]", "", name.upper())


def seed_manual_rows(path: Path = MANUAL_CSV) -> dict[str, dict[str, float]]:
    """The seed's per-case manual figures (ROI, and DL-parenchymal / 3-D / 2-D on the manual mask), by ``case_id``."""
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, float]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            figures = {}
            for key in ("manual_select_roi", "manual_seg_roi", "manual_seg_3d", "manual_seg_2d"):
                try:
                    figures[key] = float(row[key])
                except (KeyError, ValueError):
                    continue
            rows[case_id(row["CT_id"])] = figures
    return rows


def seed_masks(folder: Path = SEED) -> dict[str, Path]:
    """The seed's published liver masks, by ``case_id``."""
    if not folder.is_dir():
        return {}
    return {case_id(path.name[: -len(SEED_MASK_SUFFIX)]): path for path in sorted(folder.glob(f"*{SEED_MASK_SUFFIX}"))}


def validation_cases() -> list[ValidationCase]:
    """Every chest CT folder (with the seed's references where they exist), then the labelled cases."""
    manual, masks = seed_manual_rows(), seed_masks()
    cases = []
    for folder in sorted(p for p in CHEST_CT.iterdir() if p.is_dir()) if CHEST_CT.is_dir() else []:
        key = case_id(folder.name)
        figures = manual.get(key, {})
        mask = masks.get(key)
        cases.append(ValidationCase(
            name=folder.name, ct=folder, reference=mask, reference_kind="seed's manual mask" if mask else "",
            manual_hu=figures.get(MANUAL_COLUMN), seed_figures=figures, expected=EXPECTED.get(folder, ""),
        ))  # fmt: skip
    for case in CASES:
        if case.ct.exists():
            reference = case.reference if case.reference.exists() else None
            cases.append(ValidationCase(
                name=case.name, ct=case.ct, reference=reference, label=case.label,
                reference_kind=case.reference_kind if reference else "", expected=EXPECTED.get(case.ct, ""),
            ))  # fmt: skip
    return cases


def run_product(case: ValidationCase, options: AnalysisOptions, models: ModelCache) -> list[SeriesReport]:
    """The CLI's path for each series (or NIfTI file) found in ``case.ct``."""
    found = discover([case.ct])
    reports = [analyze_dicom_series(files, options, models) for files in found.series]
    return reports + [analyze_nifti(path, options, models) for path in found.nifti]


def codes(findings: Sequence[Any]) -> list[str]:
    return [str(finding.code.value) for finding in findings]


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)


def rois_json(result: AnalysisResult) -> list[dict[str, Any]]:
    """Slice, mean HU and placement rule of each ROI (the rule is ``seed`` where the result predates rules)."""
    return [{"slice_index": roi.slice_index, "mean_hu": round(roi.mean_hu, 2),
             "rule": str(getattr(getattr(roi, "rule", None), "value", "seed"))} for roi in result.rois]  # fmt: skip


def validate(case: ValidationCase, options: AnalysisOptions, models: ModelCache) -> list[dict[str, Any]]:
    started = time.perf_counter()
    reports = run_product(case, options, models)
    seconds = time.perf_counter() - started
    if not reports:
        return [{"case": case.name, "input": str(case.ct), "status": "no series", "grade": None, "reasons": [],
                 "warnings": [], "expected": case.expected, "seconds": round(seconds, 1)}]  # fmt: skip
    rows = []
    for index, report in enumerate(reports):
        result = report.result
        name = case.name if len(reports) == 1 else f"{case.name} #{index + 1}"
        graded_hu = getattr(result, "graded_hu", None)  # absent before the graded-value contract
        row: dict[str, Any] = {
            "case": name,
            "input": str(case.ct.relative_to(SHARED_DATA)) if case.ct.is_relative_to(SHARED_DATA) else str(case.ct),
            "series_uid": result.series_uid,
            "status": report.outcome.value,
            "eligible": result.eligible,
            "grade": result.grade.value,
            "reasons": codes(result.reasons),
            "warnings": codes(result.warnings),
            "borderline": getattr(result, "borderline", None),
            "parenchymal_hu": rounded(result.parenchymal_hu),
            "graded_hu": rounded(graded_hu),
            "volumetric_hu": rounded(result.volumetric_hu),
            "axial_hu": rounded(result.axial_hu),
            "liver_volume_ml": rounded(result.liver_volume_ml),
            "rois": rois_json(result),
            "manual_roi_hu": rounded(case.manual_hu),
            "manual_difference_hu": difference(rounded(result.parenchymal_hu), rounded(case.manual_hu)),
            "graded_manual_difference_hu": difference(rounded(graded_hu), rounded(case.manual_hu)),
            "seed_csv": case.seed_figures,
            "reference": case.reference_kind or None,
            "expected": case.expected,
            "as_expected": None if not case.expected else result.grade is Grade.NOT_GRADED,
            "model": result.model.to_json(),
            "timings_s": {key: round(value, 2) for key, value in result.timings_s.items()},
            "seconds": round(seconds / len(reports), 1),
        }
        if case.reference is not None and len(reports) == 1:
            row.update(against_reference(case, result, options, models))
        rows.append(row)
    return rows


def against_reference(case: ValidationCase, result: AnalysisResult, options: AnalysisOptions,
                      models: ModelCache) -> dict[str, Any]:  # fmt: skip
    """Dice, HD95, volume and HU differences against the reference mask (measured the same way)."""
    assert case.reference is not None
    forced = result.working_masks is None  # rejected before measuring: measure anyway (``--ignore-eligibility``)
    if forced:
        (report,) = run_product(case, replace(options, ignore_eligibility=True), models)
        result = report.result
        if result.working_masks is None:
            return {"forced": True}
    series = load_ct(case.ct)
    reference = measure_series(series, read_mask(case.reference, series.volume, label=case.label), eligible=True, reasons=())
    figures: dict[str, Any] = dict(compare(result, reference))
    measured = {"parenchymal_hu": figures.pop("parenchymal_hu"), "volume_ml": figures.pop("volume_ml")}
    if forced:  # what the forced run measured and decided; the row's own columns stay the product's
        figures.update({f"forced_{key}": rounded(value) for key, value in measured.items()})
        figures.update(forced_grade=result.grade.value, forced_reasons=codes(result.reasons))
    return {"forced": forced, **figures,
            "reference_parenchymal_hu": rounded(reference.parenchymal_hu),
            "reference_volumetric_hu": rounded(reference.volumetric_hu),
            "reference_axial_hu": rounded(reference.axial_hu),
            "reference_volume_ml": rounded(reference.liver_volume_ml),
            "reference_rois": rois_json(reference)}  # fmt: skip


# ---------------------------------------------------------------------------------------
# output

COLUMNS = (
    ("case", "case"), ("status", "status"), ("grade", "grade or why not"), ("borderline", "borderline"),
    ("parenchymal_hu", "DL-parenchymal HU"), ("graded_hu", "graded HU"), ("volumetric_hu", "DL-volumetric HU"),
    ("axial_hu", "DL-axial HU"), ("manual_roi_hu", "manual ROI HU"), ("manual_difference_hu", "DL-par. - manual"),
    ("dice", "Dice"), ("hd95_mm", "HD95 mm"), ("volume_difference_pct", "volume diff %"),
    ("reference_parenchymal_hu", "DL-par. on ref. mask"), ("reference", "reference mask"), ("seconds", "s"),
)  # fmt: skip


def cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "case" and row.get("expected"):
        return f"{value} (expected: {row['expected']})"
    if key == "grade" and value in (None, Grade.NOT_GRADED.value):
        text = "not graded: " + (", ".join(row["reasons"]) or "no reason given")
        if row.get("forced_grade"):  # measured anyway for the comparison: what the image checks said
            text += f" (forced: {row['forced_grade']}" + "".join(f", {code}" for code in row["forced_reasons"]) + ")"
        return text
    if key == "dice" and row.get("forced"):
        return f"{value} (forced)"
    if key == "borderline" and value is None:
        return "n/a"
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and key.endswith(("_hu", "_pct")):
        return f"{value:+.2f}" if "difference" in key else f"{value:.2f}"
    return str(value)


def summary(rows: Sequence[dict[str, Any]]) -> str:
    dice = [row["dice"] for row in rows if row.get("dice") is not None]
    manual = [abs(row["manual_difference_hu"]) for row in rows if row.get("manual_difference_hu") is not None]
    parts = []
    if dice:
        parts.append(f"Dice mean {statistics.fmean(dice):.3f} (min {min(dice):.3f}) over {len(dice)} reference masks")
    if manual:
        parts.append(f"DL-parenchymal vs manual ROI MAE {statistics.fmean(manual):.2f} HU over {len(manual)} case(s)")
    unexpected = [row["case"] for row in rows if row.get("as_expected") is False]
    if unexpected:
        parts.append("NOT as expected: " + ", ".join(unexpected))
    return "here: " + ("; ".join(parts) or "no reference figures")


def table(rows: Sequence[dict[str, Any]], markdown: bool) -> str:
    headers = [title for _, title in COLUMNS]
    lines = [[cell(row, key) for key, _ in COLUMNS] for row in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    return "\n".join(" | ".join(line) for line in [headers, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print a README-ready markdown table")
    args = parser.parse_args(argv)
    if not SHARED_DATA.is_dir():
        print(f"skipped: no real data at {SHARED_DATA} (../shared/data beside the checkout)", file=sys.stderr)
        return 0
    cases = validation_cases()
    if not cases:
        print(f"skipped: no chest CT or labelled case found under {SHARED_DATA}", file=sys.stderr)
        return 0
    started = time.perf_counter()
    backend: Backend = load_backend(args.model, device=args.device)
    load_s = time.perf_counter() - started
    models = ModelCache(lambda: backend)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="liverfat-validate-") as out_dir:
        options = AnalysisOptions(out_dir=Path(out_dir), write_dicom=False)
        for case in cases:
            print(f"{case.name} ...", file=sys.stderr, flush=True)
            rows += validate(case, options, models)
    print(f"model: {backend.info.name} ({backend.info.version}, {backend.info.device}), loaded in {load_s:.1f} s; "
          "times are loading + analysis of each case on a shared machine, so noisy")  # fmt: skip
    print()
    print(table(rows, args.markdown))
    print()
    print(summary(rows))
    print(SEED_FIGURES)
    if args.json:
        args.json.write_text(json.dumps({"model": backend.info.to_json(), "model_load_s": round(load_s, 1),
                                         "seed": SEED_FIGURES, "summary": summary(rows), "cases": rows},
                                        indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
