"""Deterministic UIDs (and creation stamps) for the objects liverfat writes.

A node that crashes after sending half of its outputs, or a sender that retries, must
produce the *same* SOP Instance UIDs again, so the PACS deduplicates instead of filing a
second copy. A changed result (other grade, other HU, other mask, other software
version, other site text) must produce *new* UIDs, so it never silently replaces what a
radiologist already saw under the old UID.

So every UID is derived from a content digest: the source SeriesInstanceUID, the
software version and the result (numbers, grade, reasons, model, a hash of the masks),
plus a digest of the site's output settings, and the role of the object
(``seg``/``sr``/``keyimage``, series or instance). The digest becomes a name-based
(version 5) UUID, written in the ``2.25.<decimal>`` form of PS3.5 B.2.

References
----------
PS3.5 Annex B.2 "UUID Derived UID"; ITU-T X.667.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import TypedDict

import numpy as np
from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM

from liverfat.result import AnalysisResult

#: Namespace of every liverfat name-based UUID (itself name-based, so it never changes).
LIVERFAT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:liverfat:dicom-uid")

#: Keys of ``AnalysisResult.to_json()`` that describe the run, not the result.
_RUN_ONLY_KEYS = ("timings_s",)
_RUN_ONLY_MODEL_KEYS = ("device",)


def derived_uid(*parts: str) -> str:
    """A ``2.25.<int>`` UID that depends only on ``parts`` (in order)."""
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(LIVERFAT_NAMESPACE, name).int}"


def mask_digest(result: AnalysisResult) -> str:
    """SHA-256 over the source-grid liver mask and ROI label map (shape included)."""
    digest = hashlib.sha256()
    masks = result.source_masks
    if masks is None:
        digest.update(b"no masks")
        return digest.hexdigest()
    for name, array in (("liver", masks.liver.array), ("rois", masks.rois.array)):
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{name}:{contiguous.shape}:{contiguous.dtype.str}:".encode())
        digest.update(contiguous.data)  # its buffer: the bytes of tobytes(), without copying 80 MB
    return digest.hexdigest()


def result_digest(result: AnalysisResult) -> str:
    """SHA-256 over what the outputs show: numbers, grade, reasons, model, masks.

    Timings and the compute device are left out: a retry on another machine that reaches
    the same result must reproduce the same UIDs.
    """
    content = result.to_json()
    for key in _RUN_ONLY_KEYS:
        content.pop(key, None)
    for key in _RUN_ONLY_MODEL_KEYS:
        content["model"].pop(key, None)
    content["mask_sha256"] = mask_digest(result)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class OutputUids:
    """The UIDs of one set of outputs, all derived from ``key``."""

    key: str

    def series(self, role: str) -> str:
        return derived_uid(self.key, role, "series")

    def instance(self, role: str) -> str:
        return derived_uid(self.key, role, "instance")

    def tracking(self, name: str) -> str:
        """Tracking UID of a finding (ROI, liver, grade): shared by its SEG segment and SR group."""
        return derived_uid(self.key, "tracking", name)


def output_uids(result: AnalysisResult, settings_digest: str = "") -> OutputUids:
    """UIDs for the outputs of ``result``; ``settings_digest`` covers site-configured text."""
    key = "|".join(
        (result.series_uid, result.software_version, result_digest(result), settings_digest)
    )
    return OutputUids(hashlib.sha256(key.encode()).hexdigest())


def frame_of_reference_fallback(series_uid: str) -> str:
    """FrameOfReferenceUID for a source series that has none (the SEG requires one).

    It depends only on the source series, so every output of that series agrees.
    """
    return derived_uid(series_uid, "frame-of-reference")


class CreationKwargs(TypedDict):
    """Content and series date/time, as highdicom's keyword arguments (see ``creation_kwargs``)."""

    content_date: date
    content_time: time
    series_date: date
    series_time: time


def creation_kwargs(created: datetime) -> CreationKwargs:
    """Content and series date/time for a highdicom constructor, all from ``created``.

    The caller chooses ``created`` (the service passes the job's first processing time),
    so a rewrite of the same result can be byte-identical, not only UID-identical.
    """
    return {
        "content_date": created.date(),
        "content_time": created.time(),
        "series_date": created.date(),
        "series_time": created.time(),
    }


def stamp_instance_creation(dataset: Dataset, created: datetime) -> None:
    """Overwrite the dates and times highdicom takes from the clock with ``created``.

    These are the instance creation date/time and the contribution date/time highdicom
    records for itself in the Contributing Equipment Sequence.
    """
    dataset.InstanceCreationDate = DA(created.date())
    dataset.InstanceCreationTime = TM(created.time())
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(created)
