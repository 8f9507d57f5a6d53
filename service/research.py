"""``liverfat analyze`` and ``liverfat check`` over files and folders: discovery, ``results.csv``, ``skipped.json``.

Each series found goes through :mod:`liverfat.analysis`, the same code the node's worker runs.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from liverfat.analysis import (
    AnalysisOptions,
    BackendLoader,
    ModelCache,
    SeriesReport,
    analyze_dicom_series,
    analyze_nifti,
    no_headers_finding,
    write_json_atomically,
)
from liverfat.dicom_io.eligibility import EligibilityPolicy, check_eligibility
from liverfat.dicom_io.read import discover
from liverfat.dicom_io.series import SeriesFiles, SkippedFile
from liverfat.files import durable_write

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "series_uid", "study_uid", "status", "eligible", "grade", "borderline", "graded_hu", "parenchymal_hu",
    "volumetric_hu", "axial_hu", "liver_volume_ml", "threshold_hu", "borderline_margin_hu", "model", "reasons",
    "warnings",
)  # fmt: skip


def check_inputs(inputs: Sequence[Path], policy: EligibilityPolicy) -> Iterator[dict[str, Any]]:
    """One JSON-ready decision per series (headers only), then one per file that is no CT series."""
    found = discover(inputs)
    for series in found.series:
        decision = check_eligibility(series.headers, policy)
        yield {
            "series_uid": series.series_uid,
            "files": len(series.files),
            "eligible": decision.eligible,
            "reasons": [f.to_json() for f in decision.findings],
            "pending": [f.to_json() for f in decision.pending],  # left to the image (analyze decides)
        }
    for path in found.nifti:
        yield {"series_uid": None, "file": str(path), "files": 1, "eligible": None,
               "reasons": [no_headers_finding(path).to_json()]}  # fmt: skip
    for skipped in found.skipped:
        yield _skipped_json(skipped)


def analyze_inputs(inputs: Sequence[Path], options: AnalysisOptions, load_model: BackendLoader,
                on_series_done: Callable[[SeriesReport], None] | None = None) -> list[SeriesReport]:  # fmt: skip
    """Analyse every series found in ``inputs``; write per-series results and ``results.csv``.

    ``load_model`` is called at most once, on the first series that needs a model, so a run
    that only rejects series (or uses ``--mask``) never loads one.
    """
    found = discover(inputs)
    for skipped in found.skipped:
        log.info("skipped %s: %s", skipped.path, skipped.finding.message)
    models = ModelCache(load_model)
    reports: list[SeriesReport] = []
    items: tuple[SeriesFiles | Path, ...] = (*found.series, *found.nifti)
    for item in items:
        if isinstance(item, SeriesFiles):
            report = analyze_dicom_series(item, options, models)
        else:
            report = analyze_nifti(item, options, models)
        reports.append(report)
        if on_series_done is not None:
            on_series_done(report)
    write_results_csv(options.out_dir / "results.csv", reports)
    if found.skipped:
        write_json_atomically(options.out_dir / "skipped.json", [_skipped_json(s) for s in found.skipped])
    return reports


def write_results_csv(path: Path, reports: Sequence[SeriesReport]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for report in reports:
        data = report.result.to_json()
        writer.writerow({
            **{key: data[key] for key in CSV_COLUMNS if key in data},
            "status": report.outcome.value,
            "model": report.result.model.name,
            "reasons": "; ".join(r["code"] for r in data["reasons"]),
            "warnings": "; ".join(w["code"] for w in data["warnings"]),
        })  # fmt: skip
    durable_write(path, text.getvalue().encode())


def _skipped_json(skipped: SkippedFile) -> dict[str, Any]:
    return {"series_uid": None, "file": str(skipped.path), "files": 1, "eligible": False,
            "reasons": [skipped.finding.to_json()]}  # fmt: skip
