"""One series' files analysed into the outcome the spool records: shared by the node's worker and fleet workers.

The same code as ``liverfat analyze`` (``liverfat.analysis.analyze_dicom_series``): header
eligibility first, then measurement and the DICOM outputs, written under ``out_dir``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from liverfat.analysis import AnalysisOptions, ModelCache, Outcome, analyze_dicom_series
from liverfat.dicom_io.outputs import WrittenFile
from liverfat.dicom_io.read import read_series
from liverfat.service.config import NodeConfig
from liverfat.service.spool_types import JobResult, JobState, OutputFile

STATES = {Outcome.PROCESSED: JobState.DONE, Outcome.REJECTED: JobState.REJECTED, Outcome.FAILED: JobState.FAILED}


@dataclass(frozen=True)
class ResearchOptions:
    """The ``liverfat analyze`` options a research task carries (``settings["research"]``), so that a fleet
    worker writes what a local ``analyze`` would; the defaults are the node's."""

    ignore_eligibility: bool = False
    write_preview: bool = False
    write_dicom: bool = True
    save_mask: bool = False
    save_ct: bool = False

    @classmethod
    def of(cls, options: AnalysisOptions) -> ResearchOptions:
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ResearchOptions:
        """From a task's ``settings["research"]``; ``None`` (a node's task): the node's options."""
        return cls(**{f.name: bool(data[f.name]) for f in fields(cls) if data is not None and f.name in data})

    def to_json(self) -> dict[str, bool]:
        return asdict(self)


def analyze_series_files(series_uid: str, files: Sequence[Path], out_dir: Path, root: Path, config: NodeConfig,
                         models: ModelCache, research: ResearchOptions | None = None) -> JobResult:  # fmt: skip
    """Analyse the series held in ``files``; outputs go to ``out_dir`` and are named relative to ``root``."""
    started = time.monotonic()
    found = read_series(series_uid, files)
    discover_s = time.monotonic() - started
    if not found.series:
        reasons = tuple(skipped.finding.to_json() for skipped in found.skipped)
        return JobResult(JobState.REJECTED, reasons=reasons, error="no readable CT instance in the series")
    extra = research or ResearchOptions()
    options = AnalysisOptions(out_dir=out_dir, policy=config.eligibility, config=config.analysis, site=config.site,
                             not_applicable_sr=config.worker.ineligible_result == "sr",
                             ignore_eligibility=extra.ignore_eligibility, write_preview=extra.write_preview,
                             write_dicom=extra.write_dicom, save_mask=extra.save_mask, save_ct=extra.save_ct)  # fmt: skip
    report = analyze_dicom_series(found.series[0], options, models)
    result = report.result
    return JobResult(
        state=STATES[report.outcome],
        grade=result.grade.value,
        parenchymal_hu=result.parenchymal_hu,
        borderline=result.borderline,
        reasons=tuple(f.to_json() for f in result.reasons),
        timings={"discover": discover_s, **result.timings_s},
        outputs=tuple(_output_file(written, root) for written in report.dicom),
        error="; ".join(f.message for f in result.reasons) if report.outcome is Outcome.FAILED else None,
    )


def _output_file(written: WrittenFile, root: Path) -> OutputFile:
    """The outbox row of a DICOM output (already durable: ``liverfat.files``), from what the writer knew."""
    return OutputFile(str(written.path.relative_to(root)), written.sop_class_uid, written.sop_instance_uid,
                      written.transfer_syntax_uid)  # fmt: skip
