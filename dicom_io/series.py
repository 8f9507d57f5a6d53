"""What the reader hands on: a series' files and headers, and a loaded CT series."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset

from liverfat.errors import Finding
from liverfat.volume import Volume


@dataclass(frozen=True)
class SeriesFiles:
    """The files of one SeriesInstanceUID with their headers (read without pixel data)."""

    series_uid: str
    files: tuple[Path, ...]
    headers: tuple[Dataset, ...]


@dataclass(frozen=True)
class SkippedFile:
    """An input file that belongs to no CT series, with the reason."""

    path: Path
    finding: Finding


@dataclass(frozen=True)
class CTSeries:
    """A CT series as one HU volume.

    ``datasets`` holds the source datasets in the volume's slice order (``array[k]``
    comes from ``datasets[k]``); it is empty for NIfTI input, which has no DICOM source.
    """

    volume: Volume
    series_uid: str
    study_uid: str | None
    datasets: tuple[Dataset, ...] = ()
    source_files: tuple[Path, ...] = ()
    warnings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def is_dicom(self) -> bool:
        return bool(self.datasets)
