"""One series, end to end: eligibility -> load -> image checks -> measurement -> outputs -> ``result.json``.

The node's worker and ``liverfat analyze`` both run a series through here. Reading and
eligibility come from ``dicom_io``, the measurement from ``inference``; this module decides
per series what to run and writes ``<out>/<series>/result.json`` beside the DICOM outputs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from liverfat import __version__
from liverfat.dicom_io.eligibility import EligibilityPolicy, check_eligibility
from liverfat.dicom_io.outputs import WrittenFile, write_not_applicable_sr, write_outputs
from liverfat.dicom_io.read import load_series, read_mask, read_nifti
from liverfat.dicom_io.series import CTSeries, SeriesFiles
from liverfat.dicom_io.site import OutputSettings
from liverfat.errors import Finding, LiverfatError, Reason
from liverfat.files import durable_path, durable_write
from liverfat.inference.backend import Backend
from liverfat.inference.image_checks import not_ct_finding, region_finding
from liverfat.inference.pipeline import AnalysisConfig, measure_series
from liverfat.result import AnalysisResult, Grade, ModelInfo

log = logging.getLogger(__name__)

NOT_RUN = ModelInfo(name="none", version="n/a")
_UNUSABLE_HEADERS = frozenset({Reason.MISSING_ATTRIBUTE, Reason.INVALID_ATTRIBUTE})


class Outcome(StrEnum):
    """What happened to one series."""

    PROCESSED = "processed"
    REJECTED = "rejected"  # ineligible or unreadable input, with reasons: a clean decision
    FAILED = "failed"  # something went wrong on our side


@dataclass(frozen=True)
class AnalysisOptions:
    """Everything ``analyze`` needs besides the inputs."""

    out_dir: Path
    mask: Path | None = None
    force: bool = False
    save_mask: bool = False
    write_dicom: bool = True
    not_applicable_sr: bool = False  # a rejected series gets the short "not applicable" summary SR
    policy: EligibilityPolicy = field(default_factory=EligibilityPolicy)
    config: AnalysisConfig = field(default_factory=AnalysisConfig)
    site: OutputSettings = field(default_factory=OutputSettings)


@dataclass(frozen=True)
class SeriesReport:
    """One line of ``results.csv``: the outcome of one series and where its files went."""

    series_uid: str
    outcome: Outcome
    result: AnalysisResult
    files: tuple[Path, ...] = ()  # ``result.json``, then the saved mask if any
    dicom: tuple[WrittenFile, ...] = ()  # the DICOM outputs, in the order written

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Every file written for the series: ``result.json``, the mask, then the DICOM outputs."""
        return (*self.files, *(written.path for written in self.dicom))


BackendLoader = Callable[[], Backend]


class ModelCache:
    """Loads the backend once, on first use."""

    def __init__(self, load_model: BackendLoader) -> None:
        self._load_model = load_model
        self._backend: Backend | None = None

    def get(self) -> Backend:
        if self._backend is None:
            self._backend = self._load_model()
        return self._backend


def analyze_dicom_series(files: SeriesFiles, options: AnalysisOptions, models: ModelCache) -> SeriesReport:
    """Eligibility from the headers, then (if eligible or forced) the full analysis of one series.

    Headers that name no body region leave it to the image (``Eligibility.region_from_image``, see
    ``_check_image``). A rejected series gets the "not applicable" SR when ``options.not_applicable_sr``
    asks for it, unless its headers themselves were refused: an SR cannot be built on a study
    without a Study Instance UID or in an unknown character set.
    """
    report = _analyze_dicom(files, options, models)
    refused_headers = any(reason.code in _UNUSABLE_HEADERS for reason in report.result.reasons)
    if report.outcome is Outcome.REJECTED and options.not_applicable_sr and options.write_dicom and not refused_headers:
        folder = report.files[0].parent
        summary = write_not_applicable_sr(files, report.result, folder, site=options.site)
        report = replace(report, dicom=(*report.dicom, summary))
    return report


def _analyze_dicom(files: SeriesFiles, options: AnalysisOptions, models: ModelCache) -> SeriesReport:
    decision = check_eligibility(files.headers, options.policy)
    study_uid = str(files.headers[0].get("StudyInstanceUID", "")) or None
    if not decision.eligible and not options.force:
        result = not_analysed(files.series_uid, study_uid, decision.findings, options)
        return _finish(result, Outcome.REJECTED, options, series=None)
    started = time.perf_counter()
    try:
        series = load_series(files)
    except LiverfatError as error:
        result = not_analysed(files.series_uid, study_uid, (*decision.findings, error.finding), options)
        return _finish(result, Outcome.REJECTED, options, series=None)
    load_s = time.perf_counter() - started
    return _analyze_loaded(series, decision.eligible, decision.findings, options, models, {"load": load_s},
                           confirm_region=decision.region_from_image)


def analyze_nifti(path: Path, options: AnalysisOptions, models: ModelCache) -> SeriesReport:
    """A NIfTI volume has no headers to check: it is analysed, with a warning that says so."""
    started = time.perf_counter()
    try:
        series = read_nifti(path)
    except LiverfatError as error:
        result = not_analysed(path.name, None, (error.finding,), options)
        return _finish(result, Outcome.REJECTED, options, series=None)
    load_s = time.perf_counter() - started
    return _analyze_loaded(series, True, (no_headers_finding(path),), options, models, {"load": load_s})


def _analyze_loaded(series: CTSeries, eligible: bool, reasons: Sequence[Finding], options: AnalysisOptions,
                    models: ModelCache, timings: dict[str, float], *,
                    confirm_region: bool = False) -> SeriesReport:  # fmt: skip
    started = time.perf_counter()
    series, refusal = _check_image(series, confirm_region)
    timings = {**timings, "image_checks": time.perf_counter() - started}
    if refusal is not None:
        reasons = (*reasons, refusal)
        if refusal.code is Reason.NOT_CT_IMAGE or not options.force:
            result = not_analysed(series.series_uid, series.study_uid, reasons, options)
            return _finish(result, Outcome.REJECTED, options, series=None)
        eligible = False  # --force: a region the image does not confirm is measured, not graded
    try:
        liver: Backend | Any = read_mask(options.mask, series.volume) if options.mask else models.get()
        result = measure_series(series, liver, eligible=eligible, reasons=reasons, config=options.config)
    except LiverfatError as error:
        outcome = Outcome.FAILED if error.reason is Reason.BACKEND_UNAVAILABLE else Outcome.REJECTED
        result = not_analysed(series.series_uid, series.study_uid, (*reasons, error.finding), options)
        return _finish(result, outcome, options, series=None)
    result = replace(result, timings_s={**timings, **result.timings_s})
    return _finish(result, Outcome.PROCESSED, options, series=series)


def _check_image(series: CTSeries, confirm_region: bool) -> tuple[CTSeries, Finding | None]:
    """The pixel checks that run before any model, and the refusal they give, if any.

    Not a CT in HU (a label map, a mask): ``NOT_CT_IMAGE``, whatever ``--force`` says. When the headers
    left the body region to the image: ``NOT_CHEST`` with the evidence, or the series back with the
    ``REGION_FROM_IMAGE`` evidence among its warnings.
    """
    refusal = not_ct_finding(series.volume)
    if refusal is not None or not confirm_region:
        return series, refusal
    region = region_finding(series.volume)
    if region.code is Reason.REGION_FROM_IMAGE:
        return replace(series, warnings=(*series.warnings, region)), None
    return series, region


def _finish(result: AnalysisResult, outcome: Outcome, options: AnalysisOptions, *, series: CTSeries | None) -> SeriesReport:
    """Write the series' files; ``result.json`` last, with the time the others took as ``timings_s.write``."""
    series_dir = options.out_dir / safe_folder_name(result.series_uid)
    started = time.perf_counter()
    files: list[Path] = []
    dicom: list[WrittenFile] = []
    if series is not None and options.save_mask and result.source_masks is not None:
        mask_path = series_dir / "liver_mask.nii.gz"
        liver = result.source_masks.liver
        with durable_path(mask_path) as tmp:
            sitk.WriteImage(liver.with_array(liver.array.astype("uint8")).to_sitk(), str(tmp), useCompression=True)
        files.append(mask_path)
    if series is not None and series.is_dicom and options.write_dicom:
        dicom = write_outputs(series, result, series_dir, site=options.site)
    if series is not None:
        result = replace(result, timings_s={**result.timings_s, "write": time.perf_counter() - started})
    result_json = series_dir / "result.json"
    write_json_atomically(result_json, {**result.to_json(), "status": outcome.value})
    log.info("series %s: %s, grade %s", result.series_uid, outcome.value, result.grade.value)
    return SeriesReport(result.series_uid, outcome, result, (result_json, *files), tuple(dicom))


def not_analysed(series_uid: str, study_uid: str | None, reasons: Sequence[Finding],
                 options: AnalysisOptions) -> AnalysisResult:  # fmt: skip
    """The result of a series that was rejected before any measurement."""
    return AnalysisResult(
        series_uid=series_uid, study_uid=study_uid, eligible=False, reasons=tuple(reasons),
        grade=Grade.NOT_GRADED, threshold_hu=options.config.grading.threshold_hu, parenchymal_hu=None,
        volumetric_hu=None, axial_hu=None, liver_volume_ml=None, rois=(), warnings=(), model=NOT_RUN,
        software_version=__version__,
    )  # fmt: skip


def no_headers_finding(path: Path) -> Finding:
    return Finding(Reason.NO_HEADERS, f"{path.name} is NIfTI: no DICOM headers, so contrast and body part were not checked")


def safe_folder_name(series_uid: str) -> str:
    """A UID or file stem as a folder name: anything but [0-9A-Za-z._-] becomes '_'."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in series_uid)
    return cleaned.strip(".") or "series"


def write_json_atomically(path: Path, data: Any) -> None:
    durable_write(path, (json.dumps(data, indent=2) + "\n").encode())
