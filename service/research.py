"""``liverfat analyze`` and ``liverfat check`` over files and folders: discovery, ``results.csv``, ``skipped.json``.

Each series found goes through :mod:`liverfat.analysis`, the same code the node's worker runs.

``results.csv`` has one row per case (DICOM series or NIfTI file), keyed by its output folder
(``analysis.case_folder``). A run into an ``--out`` that already holds one keeps its rows and
skips every case whose row is current: same input files (paths, sizes, modification times),
same software version, same settings (model asked for, mask, analysis and eligibility settings,
outputs asked for), and a result (processed or rejected, not failed). ``redo`` analyses them all again.
The file is rewritten durably after each case, so an interrupted run resumes where it stopped.
``liverfat analyze --broker`` (``service/fleet/research.py``) plans and records through the same
:class:`RunPlan`, with the fleet's workers analysing the DICOM series.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from liverfat import __version__
from liverfat.analysis import (
    AnalysisOptions,
    BackendLoader,
    ModelCache,
    Outcome,
    SeriesReport,
    analyze_dicom_series,
    analyze_nifti,
    case_folder,
    no_headers_finding,
    write_json_atomically,
)
from liverfat.dicom_io.eligibility import EligibilityPolicy, check_eligibility
from liverfat.dicom_io.read import discover
from liverfat.dicom_io.series import SeriesFiles, SkippedFile
from liverfat.files import durable_write

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
SKIPPED_JSON = "skipped.json"
IDENTIFIER_COLUMNS = ("patient_id", "accession_number", "study_date")
CSV_COLUMNS = (
    "folder", "source", "series_uid", "study_uid", *IDENTIFIER_COLUMNS, "series_description", "slice_thickness_mm",
    "status", "eligible", "grade", "borderline", "graded_hu", "parenchymal_hu", "volumetric_hu", "axial_hu",
    "liver_volume_ml", "threshold_hu", "borderline_margin_hu", "model", "model_version", "reasons", "warnings",
    "software_version", "analysed_at", "input_fingerprint", "settings_fingerprint",
)  # fmt: skip
_HEADER_COLUMNS = {"patient_id": "PatientID", "accession_number": "AccessionNumber", "study_date": "StudyDate",
                   "series_description": "SeriesDescription", "slice_thickness_mm": "SliceThickness"}  # fmt: skip
_CURRENT_STATUSES = frozenset({Outcome.PROCESSED.value, Outcome.REJECTED.value})
_ROW_COLUMNS = frozenset({"status", "model", "reasons", "warnings"})  # in result.json, but not as the row has them


@dataclass(frozen=True)
class ResearchRun:
    """One ``analyze`` run: the analysis options plus what decides resuming and the CSV's columns."""

    options: AnalysisOptions
    model: str = "default"  # the model asked for (a name or folder); ignored with ``options.mask``
    precision: str = "auto"  # the arithmetic asked for (``[model] precision``); ignored with ``options.mask``
    redo: bool = False  # analyse every case again, current or not (``--force``)
    identifiers: bool = True  # PatientID, AccessionNumber and StudyDate in results.csv


@dataclass(frozen=True)
class Case:
    """One input to analyse: a DICOM series or a NIfTI file, with its output folder and CSV row facts."""

    item: SeriesFiles | Path
    folder: str
    source: str  # the folder holding the series' files, or the NIfTI file
    fingerprint: str
    header_facts: Mapping[str, str]


@dataclass(frozen=True)
class CaseOutcome:
    """A case's row in results.csv after this run.

    ``report`` is None when the row was current and kept, or when a fleet worker analysed the case
    (``analysed_by`` names it: ``liverfat analyze --broker``); the row was read from its ``result.json``.
    """

    case: Case
    row: Mapping[str, str]
    report: SeriesReport | None
    analysed_by: str | None = None

    @property
    def status(self) -> str:
        return self.row.get("status", "")

    @property
    def reason_codes(self) -> list[str]:
        return [code for code in self.row.get("reasons", "").split("; ") if code]


class RunListener(Protocol):
    """What a run tells its watcher (the CLI's progress display)."""

    def run_started(self, total: int) -> None: ...

    def case_started(self, index: int, case: Case) -> None: ...

    def stage(self, name: str) -> None: ...

    def case_done(self, index: int, outcome: CaseOutcome) -> None: ...


@dataclass(frozen=True)
class RunResult:
    """Every case of the run in order, and the input files that were no CT (with their reasons)."""

    cases: tuple[CaseOutcome, ...]
    skipped: tuple[SkippedFile, ...]

    @property
    def reports(self) -> list[SeriesReport]:
        """The reports of the cases analysed in this run (not those kept as current)."""
        return [case.report for case in self.cases if case.report is not None]


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


def _ignore(_stage: str) -> None:
    """No listener: stages go unreported."""


def analyze_inputs(inputs: Sequence[Path], run: ResearchRun, load_model: BackendLoader,
                   listener: RunListener | None = None) -> RunResult:  # fmt: skip
    """Analyse every case found in ``inputs`` that has no current row; write results, ``results.csv``, ``skipped.json``.

    ``load_model`` is called at most once, on the first case that needs a model, so a run
    that only rejects series, resumes, or uses a mask never loads one.
    """
    plan = plan_run(inputs, run)
    models = ModelCache(load_model)
    if listener is not None:
        listener.run_started(len(plan.cases))
    outcomes = []
    for index, case in enumerate(plan.cases, start=1):
        if listener is not None:
            listener.case_started(index, case)
        outcome = plan.kept(case) or plan.analyse(case, models, listener)
        outcomes.append(outcome)
        if listener is not None:
            listener.case_done(index, outcome)
    return plan.finish(outcomes)


@dataclass
class RunPlan:
    """One run's cases and the ``results.csv`` they resume from: what is current, and each new row written durably.

    ``analyze_inputs`` analyses the other cases here; ``liverfat analyze --broker``
    (``service/fleet/research.py``) has fleet workers analyse them and records their rows the same way.
    """

    run: ResearchRun
    cases: list[Case]
    skipped: tuple[SkippedFile, ...]
    rows: dict[str, dict[str, str]]
    settings: str  # the run's settings fingerprint

    @property
    def out_dir(self) -> Path:
        return self.run.options.out_dir

    @property
    def csv_path(self) -> Path:
        return self.out_dir / RESULTS_CSV

    def kept(self, case: Case) -> CaseOutcome | None:
        """The case's current row from an earlier run (none with ``redo``): nothing to analyse."""
        previous = self.rows.get(case.folder)
        if previous is None or self.run.redo or not _is_current(previous, case, self.settings, self.out_dir):
            return None
        return CaseOutcome(case, previous, None)

    def analyse(self, case: Case, models: ModelCache, listener: RunListener | None = None) -> CaseOutcome:
        """Analyse ``case`` in this process (its stages told to ``listener``) and record its row."""
        options = self.run.options
        on_stage = listener.stage if listener is not None else _ignore
        if isinstance(case.item, SeriesFiles):
            report = analyze_dicom_series(case.item, options, models, on_stage)
        else:
            report = analyze_nifti(case.item, options, models, on_stage)
        outcome = CaseOutcome(case, csv_row(case, report, self.settings), report)
        self.record(outcome)
        return outcome

    def record(self, *outcomes: CaseOutcome) -> None:
        """Put the outcomes' rows into results.csv, durably (one write for them all), before anything else happens."""
        for outcome in outcomes:
            self.rows[outcome.case.folder] = dict(outcome.row)
        write_results_csv(self.csv_path, self.rows.values(), identifiers=self.run.identifiers)

    def finish(self, outcomes: Sequence[CaseOutcome]) -> RunResult:
        """The run's ``results.csv`` once more and ``skipped.json``; the outcomes in the order of the cases."""
        if self.rows:  # once more at the end: a run that only resumed still applies its choice of identifier columns
            write_results_csv(self.csv_path, self.rows.values(), identifiers=self.run.identifiers)
        if self.skipped:
            write_json_atomically(self.out_dir / SKIPPED_JSON, [_skipped_json(s) for s in self.skipped])
        order = {case.folder: index for index, case in enumerate(self.cases)}
        return RunResult(tuple(sorted(outcomes, key=lambda outcome: order[outcome.case.folder])), self.skipped)


def plan_run(inputs: Sequence[Path], run: ResearchRun) -> RunPlan:
    """Discover the cases in ``inputs`` (DICOM series first, then NIfTI files) and read ``--out``'s results.csv."""
    found = discover(inputs)
    for skipped in found.skipped:
        log.info("skipped %s: %s", skipped.path, skipped.finding.message)
    cases = [*(_dicom_case(series) for series in found.series), *(_nifti_case(path) for path in found.nifti)]
    rows = read_results_csv(run.options.out_dir / RESULTS_CSV)
    return RunPlan(run, cases, tuple(found.skipped), rows, settings_fingerprint(run))


def _dicom_case(series: SeriesFiles) -> Case:
    header = series.headers[0]
    facts = {column: _header_text(header, keyword) for column, keyword in _HEADER_COLUMNS.items()}
    source = os.path.commonpath([str(path.parent) for path in series.files])
    return Case(series, case_folder(series), source, input_fingerprint(series.files), facts)


def _nifti_case(path: Path) -> Case:
    return Case(path, case_folder(path), str(path), input_fingerprint([path]), {})


def _header_text(header: Dataset, keyword: str) -> str:
    value = header.get(keyword, "")
    return "" if value is None else str(value).strip()


def input_fingerprint(paths: Sequence[Path]) -> str:
    """A digest of the files' resolved paths, sizes and modification times: changes when any file does."""
    digest = hashlib.sha256()
    for path in sorted(p.resolve() for p in paths):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def settings_fingerprint(run: ResearchRun) -> str:
    """A digest of everything besides the input and the software version that decides a case's outputs."""
    options = run.options
    mask = None
    if options.mask is not None:
        files = sorted(options.mask.rglob("*")) if options.mask.is_dir() else [options.mask]
        mask = input_fingerprint([f for f in files if f.is_file()])
    settings = {
        "model": None if options.mask is not None else [run.model, run.precision],
        "mask": mask,
        "mask_label": options.mask_label,
        "ignore_eligibility": options.ignore_eligibility,
        "analysis": _plain(options.config),
        "eligibility": _plain(options.policy),
        "outputs": [options.write_dicom, options.save_mask, options.save_ct, options.write_preview],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data that is the same in every process: sets sorted (their order follows
    the per-process string hash), dataclasses as dicts, enums and paths as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, set | frozenset):
        return sorted(_plain(item) for item in value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Enum | Path):
        return str(value)
    return value


def _is_current(row: Mapping[str, str], case: Case, settings: str, out_dir: Path) -> bool:
    return (
        row.get("status") in _CURRENT_STATUSES
        and row.get("input_fingerprint") == case.fingerprint
        and row.get("settings_fingerprint") == settings
        and row.get("software_version") == __version__
        and (out_dir / case.folder / "result.json").is_file()
    )


def csv_row(case: Case, report: SeriesReport, settings: str) -> dict[str, str]:
    """The results.csv row of one case analysed here (every value as text)."""
    return result_row(case, {**report.result.to_json(), "status": report.outcome.value}, settings)


def result_row(case: Case, result: Mapping[str, Any], settings: str) -> dict[str, str]:
    """The results.csv row of one analysed case from its ``result.json`` (``AnalysisResult.to_json`` + status)."""
    measured = {key: result[key] for key in CSV_COLUMNS if key in result and key not in _ROW_COLUMNS}
    return {
        **{key: "" if value is None else str(value) for key, value in measured.items()},
        **case.header_facts,
        "folder": case.folder,
        "source": case.source,
        "status": str(result["status"]),
        "model": str(result["model"]["name"]),
        "model_version": str(result["model"]["version"]),
        "reasons": "; ".join(r["code"] for r in result["reasons"]),
        "warnings": "; ".join(w["code"] for w in result["warnings"]),
        "analysed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "input_fingerprint": case.fingerprint,
        "settings_fingerprint": settings,
    }


def read_results_csv(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier run's results.csv by folder (empty when there is none).

    Rows of an older liverfat without a ``folder`` column are kept under their series UID
    and are never current, so their cases are analysed again.
    """
    if not path.is_file():
        return {}
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    return {row.get("folder") or row.get("series_uid", ""): row for row in rows}


def write_results_csv(path: Path, rows: Iterable[Mapping[str, str]], *, identifiers: bool = True) -> None:
    """Write ``rows`` to ``path`` durably; without ``identifiers`` the identifier columns are left out."""
    columns = [c for c in CSV_COLUMNS if identifiers or c not in IDENTIFIER_COLUMNS]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    durable_write(path, text.getvalue().encode())


def _skipped_json(skipped: SkippedFile) -> dict[str, Any]:
    return {"series_uid": None, "file": str(skipped.path), "files": 1, "eligible": False,
            "reasons": [skipped.finding.to_json()]}  # fmt: skip
