"""One series, end to end: eligibility -> load -> image checks -> measurement -> outputs -> ``result.json``.

The node's worker and ``liverfat analyze`` both run a series through here. Reading and
eligibility come from ``dicom_io``, the measurement from ``inference``; this module decides
per series what to run and writes ``<out>/<case>/result.json`` beside the DICOM outputs (and,
when asked, ``preview.png``, ``liver_mask.nii.gz`` and ``ct.nii.gz``). ``<case>`` is ``case_folder``'s name.
"""

from __future__ import annotations

import hashlib
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
from liverfat.dicom_io.nifti import nifti_stem
from liverfat.dicom_io.nifti_export import write_ct_nifti
from liverfat.dicom_io.outputs import WrittenFile, write_not_applicable_sr, write_outputs
from liverfat.dicom_io.preview import write_preview
from liverfat.dicom_io.read import load_series, read_mask, read_nifti
from liverfat.dicom_io.series import CTSeries, SeriesFiles
from liverfat.dicom_io.site import OutputSettings
from liverfat.errors import Finding, LiverfatError, Reason
from liverfat.files import durable_path, durable_write
from liverfat.inference.backend import Backend
from liverfat.inference.image_checks import not_ct_finding, region_finding
from liverfat.inference.pipeline import AnalysisConfig, measure_series
from liverfat.result import AnalysisResult, Grade, ModelInfo
from liverfat.volume import Volume

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
    mask_label: int | None = None  # which label (NIfTI value, SEG segment number) of ``mask`` is liver
    ignore_eligibility: bool = False  # measure a header-ineligible series (reported, never graded)
    save_mask: bool = False
    save_ct: bool = False  # ``ct.nii.gz`` of a DICOM series, by dicom2nifti
    write_preview: bool = False  # ``preview.png``: the key image's picture, for DICOM and NIfTI alike
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
    files: tuple[Path, ...] = ()  # ``result.json``, then the saved mask, preview and CT if any
    dicom: tuple[WrittenFile, ...] = ()  # the DICOM outputs, in the order written

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Every file written for the series: ``result.json``, the mask, then the DICOM outputs."""
        return (*self.files, *(written.path for written in self.dicom))


BackendLoader = Callable[[], Backend]
StageListener = Callable[[str], None]  # told the name of each stage as it starts: "load", "segment", ...


def _no_listener(_stage: str) -> None:
    """The default ``StageListener``: nobody is watching."""


class _StagedBackend:
    """A ``Backend`` that tells ``on_stage`` when segmentation starts and when it is done."""

    def __init__(self, backend: Backend, on_stage: StageListener) -> None:
        self._backend = backend
        self._on_stage = on_stage

    @property
    def info(self) -> ModelInfo:
        return self._backend.info

    def predict(self, ct: Volume) -> Volume:
        self._on_stage("segment")
        mask = self._backend.predict(ct)
        self._on_stage("measure")
        return mask


class ModelCache:
    """Loads the backend once, on first use."""

    def __init__(self, load_model: BackendLoader) -> None:
        self._load_model = load_model
        self._backend: Backend | None = None

    def get(self) -> Backend:
        if self._backend is None:
            self._backend = self._load_model()
        return self._backend


def case_folder(item: SeriesFiles | Path) -> str:
    """The output folder name of one input, stable across runs and unique within one output folder.

    A DICOM series is named by its Series Instance UID (unique by definition; ``discover`` gives
    one without a UID a UID of its folder's path). A NIfTI file by its name plus a short hash of
    its resolved path, so ``a/ct.nii.gz`` and ``b/ct.nii.gz`` do not share a folder.
    """
    if isinstance(item, SeriesFiles):
        return safe_folder_name(item.series_uid)
    digest = hashlib.sha256(str(item.resolve()).encode()).hexdigest()[:8]
    return f"{safe_folder_name(nifti_stem(item))}-{digest}"


def analyze_dicom_series(files: SeriesFiles, options: AnalysisOptions, models: ModelCache,
                         on_stage: StageListener = _no_listener) -> SeriesReport:  # fmt: skip
    """Eligibility from the headers, then (if eligible, or ``ignore_eligibility``) the full analysis of one series.

    Headers that name no body region leave it to the image (``Eligibility.region_from_image``, see
    ``_check_image``). A rejected series gets the "not applicable" SR when ``options.not_applicable_sr``
    asks for it, unless its headers themselves were refused: an SR cannot be built on a study
    without a Study Instance UID or in an unknown character set.
    """
    report = _analyze_dicom(files, options, models, on_stage)
    refused_headers = any(reason.code in _UNUSABLE_HEADERS for reason in report.result.reasons)
    if report.outcome is Outcome.REJECTED and options.not_applicable_sr and options.write_dicom and not refused_headers:
        folder = report.files[0].parent
        summary = write_not_applicable_sr(files, report.result, folder, site=options.site)
        report = replace(report, dicom=(*report.dicom, summary))
    return report


def _analyze_dicom(files: SeriesFiles, options: AnalysisOptions, models: ModelCache,
                   on_stage: StageListener) -> SeriesReport:  # fmt: skip
    folder = case_folder(files)
    decision = check_eligibility(files.headers, options.policy)
    study_uid = str(files.headers[0].get("StudyInstanceUID", "")) or None
    if not decision.eligible and not options.ignore_eligibility:
        result = not_analysed(files.series_uid, study_uid, decision.findings, options)
        return _finish(result, Outcome.REJECTED, options, folder, series=None)
    on_stage("load")
    started = time.perf_counter()
    try:
        series = load_series(files)
    except LiverfatError as error:
        result = not_analysed(files.series_uid, study_uid, (*decision.findings, error.finding), options)
        return _finish(result, Outcome.REJECTED, options, folder, series=None)
    load_s = time.perf_counter() - started
    return _analyze_loaded(series, decision.eligible, decision.findings, options, models, {"load": load_s},
                           folder, on_stage, confirm_region=decision.region_from_image)  # fmt: skip


def analyze_nifti(path: Path, options: AnalysisOptions, models: ModelCache,
                  on_stage: StageListener = _no_listener) -> SeriesReport:  # fmt: skip
    """A NIfTI volume has no headers to check: it is analysed, with a warning that says so."""
    folder = case_folder(path)
    on_stage("load")
    started = time.perf_counter()
    try:
        series = read_nifti(path)
    except LiverfatError as error:
        result = not_analysed(path.name, None, (error.finding,), options)
        return _finish(result, Outcome.REJECTED, options, folder, series=None)
    load_s = time.perf_counter() - started
    return _analyze_loaded(series, True, (no_headers_finding(path),), options, models, {"load": load_s}, folder,
                           on_stage)  # fmt: skip


def _analyze_loaded(series: CTSeries, eligible: bool, reasons: Sequence[Finding], options: AnalysisOptions,
                    models: ModelCache, timings: dict[str, float], folder: str, on_stage: StageListener, *,
                    confirm_region: bool = False) -> SeriesReport:  # fmt: skip
    on_stage("image checks")
    started = time.perf_counter()
    series, refusal = _check_image(series, confirm_region)
    timings = {**timings, "image_checks": time.perf_counter() - started}
    if refusal is not None:
        reasons = (*reasons, refusal)
        if refusal.code is Reason.NOT_CT_IMAGE or not options.ignore_eligibility:
            result = not_analysed(series.series_uid, series.study_uid, reasons, options)
            return _finish(result, Outcome.REJECTED, options, folder, series=None)
        eligible = False  # --ignore-eligibility: a region the image does not confirm is measured, not graded
    try:
        liver = _liver_source(series, options, models, on_stage)
        on_stage("resample" if isinstance(liver, _StagedBackend) else "measure")
        result = measure_series(series, liver, eligible=eligible, reasons=reasons, config=options.config)
    except LiverfatError as error:
        outcome = Outcome.FAILED if error.reason is Reason.BACKEND_UNAVAILABLE else Outcome.REJECTED
        result = not_analysed(series.series_uid, series.study_uid, (*reasons, error.finding), options)
        return _finish(result, outcome, options, folder, series=None)
    result = replace(result, timings_s={**timings, **result.timings_s})
    on_stage("write")
    return _finish(result, Outcome.PROCESSED, options, folder, series=series)


def _liver_source(series: CTSeries, options: AnalysisOptions, models: ModelCache,
                  on_stage: StageListener) -> Backend | Volume:  # fmt: skip
    """The user's mask on the CT's grid, or the model (loaded on first use) that tells its stages."""
    if options.mask is not None:
        on_stage("read mask")
        return read_mask(options.mask, series.volume, label=options.mask_label)
    on_stage("load model")
    return _StagedBackend(models.get(), on_stage)


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


def _finish(result: AnalysisResult, outcome: Outcome, options: AnalysisOptions, folder: str, *,
            series: CTSeries | None) -> SeriesReport:  # fmt: skip
    """Write the series' files; ``result.json`` last, with the time the others took as ``timings_s.write``."""
    series_dir = options.out_dir / folder
    started = time.perf_counter()
    files: list[Path] = []
    dicom: list[WrittenFile] = []
    if series is not None and options.save_mask and result.source_masks is not None:
        mask_path = series_dir / "liver_mask.nii.gz"
        liver = result.source_masks.liver
        with durable_path(mask_path) as tmp:
            sitk.WriteImage(liver.with_array(liver.array.astype("uint8")).to_sitk(), str(tmp), useCompression=True)
        files.append(mask_path)
    if series is not None and options.write_preview:
        files.append(write_preview(series, result, series_dir / "preview.png", options.site))
    if series is not None and series.is_dicom and options.write_dicom:
        dicom = write_outputs(series, result, series_dir, site=options.site)
    if series is not None and series.is_dicom and options.save_ct:
        files += _saved_ct(series, series_dir / "ct.nii.gz")
    if series is not None:
        result = replace(result, timings_s={**result.timings_s, "write": time.perf_counter() - started})
    result_json = series_dir / "result.json"
    write_json_atomically(result_json, {**result.to_json(), "status": outcome.value})
    log.info("series %s: %s, grade %s", result.series_uid, outcome.value, result.grade.value)
    return SeriesReport(result.series_uid, outcome, result, (result_json, *files), tuple(dicom))


def _saved_ct(series: CTSeries, path: Path) -> list[Path]:
    """``[path]`` once dicom2nifti wrote the CT there; ``[]``, with a warning logged, when it refused the series."""
    try:
        write_ct_nifti(series, path)
    except LiverfatError as error:
        log.warning("series %s: CT not saved as NIfTI: %s", series.series_uid, error.message)
        return []
    return [path]


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
