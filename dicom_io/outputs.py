"""Write the DICOM outputs of one analysed series: SEG, two TID 1500 SRs and key image.

Every object joins the source study as a new series (patient and study attributes,
SpecificCharacterSet included, are copied from the source by highdicom), and every UID
is derived from the source series, the software version, the result and the site's
settings (see ``uids.py``), so writing the same result twice gives the same instances.

All four objects are built and encoded before any is written, so a failure leaves no partial
set of outputs behind. They are built one after the other: building the circle SR and the key
image in a second thread beside the SEG was tried and gained nothing on two cores (300 slices:
best of ten 0.98 s threaded, 0.93 s in turn), as all but the SEG's short numpy steps hold the GIL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid
from pydicom.valuerep import PersonName

from liverfat.dicom_io.keyimage import build_key_image
from liverfat.dicom_io.seg import build_seg, checked_masks
from liverfat.dicom_io.series import CTSeries, SeriesFiles
from liverfat.dicom_io.site import OutputSettings
from liverfat.dicom_io.sr import build_circle_sr, build_summary_sr
from liverfat.dicom_io.uids import output_uids
from liverfat.errors import LiverfatError, Reason
from liverfat.files import durable_write
from liverfat.result import AnalysisResult
from liverfat.volume import Volume

logger = logging.getLogger(__name__)

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"  # the ROI circles (Imaging Measurement Report)
SR_SUMMARY_FILE = "sr-summary.dcm"  # grade, DL-parenchymal, liver; shown as text by OHIF
KEY_IMAGE_FILE = "keyimage.dcm"

UTF8_CHARACTER_SET = "ISO_IR 192"
_DEFAULT_REPERTOIRE = ("", "ISO_IR 6")
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


@dataclass(frozen=True)
class WrittenFile:
    """One DICOM object as written: its file and the File Meta Information a C-STORE of it needs.

    References
    ----------
    DICOM PS3.10 7.1 (DICOM File Meta Information).
    """

    path: Path
    sop_class_uid: str  # (0002,0002) 'Media Storage SOP Class UID'
    sop_instance_uid: str  # (0002,0003) 'Media Storage SOP Instance UID'
    transfer_syntax_uid: str  # (0002,0010) 'Transfer Syntax UID'


def write_outputs(
    series: CTSeries,
    result: AnalysisResult,
    out_dir: Path,
    *,
    site: OutputSettings = OutputSettings(),
    created_at: datetime | None = None,
) -> list[WrittenFile]:
    """Write ``seg.dcm``, ``sr.dcm``, ``sr-summary.dcm`` and ``keyimage.dcm`` into ``out_dir``.

    The SEG is written only when the result has a non-empty liver mask (the summary SR
    then references it); the circle SR (``sr.dcm``) only when the result has ROIs. The
    summary SR and the key image are always written, and say why when the grade was
    withheld. OHIF draws the circle SR's ROIs on the CT and shows the summary SR as text.
    ``created_at`` stamps content and creation dates (default: now); pass the job's
    first processing time to make rewrites byte-identical.

    Returns
    -------
    list[WrittenFile]
        The files written, in the order SEG (if any), circle SR (if any), summary SR, key image.

    Raises
    ------
    LiverfatError
        ``NOT_DICOM`` for a series without DICOM source (NIfTI input); ``MASK_MISMATCH``
        when the result belongs to another series or its masks do not fit this one.
    """
    if not series.is_dicom:
        raise LiverfatError(
            Reason.NOT_DICOM, f"series {series.series_uid} has no DICOM source datasets; DICOM outputs need them"
        )
    if result.series_uid != series.series_uid:
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"result is for series {result.series_uid}, expected {series.series_uid} "
            "(0020,000E) 'Series Instance UID'",
        )
    if result.source_masks is not None:
        checked_masks(series, result)
    created = created_at or datetime.now()
    uids = output_uids(result, site.digest())
    has_liver = result.source_masks is not None and bool(result.source_masks.liver.array.any())
    seg = build_seg(series, result, uids, site, created) if has_liver else None
    encoded = [] if seg is None else [_encoded(seg, SEG_FILE)]
    if seg is None:
        logger.info("series %s: no liver mask, no SEG", series.series_uid)
    if result.rois:
        encoded.append(_encoded(build_circle_sr(series, result, uids, site, created), SR_FILE))
    else:
        logger.info("series %s: no ROIs, no circle SR", series.series_uid)
    encoded.append(_encoded(build_summary_sr(series, result, seg, uids, site, created), SR_SUMMARY_FILE))
    encoded.append(_encoded(build_key_image(series, result, uids, site, created), KEY_IMAGE_FILE))
    return [_write(one, out_dir) for one in encoded]


def warm_up() -> None:
    """Load what highdicom loads on first use (its tables of the standard, about 0.4 s) now, once per process.

    highdicom reads its SOP class, IOD and module tables (JSON shipped with it) the first
    time it builds an object and keeps them for the life of the process. A node's worker
    calls this at start, so its first series does not pay for them in its write stage.
    Constructing a bare SOP instance (discarded) is what loads them.
    """
    hd.SOPClass(study_instance_uid=generate_uid(), series_instance_uid=generate_uid(), series_number=1,
                sop_instance_uid=generate_uid(), sop_class_uid=SegmentationStorage, instance_number=1, modality="SEG",
                manufacturer="liverfat", transfer_syntax_uid=ExplicitVRLittleEndian)  # fmt: skip


def write_not_applicable_sr(
    files: SeriesFiles,
    result: AnalysisResult,
    out_dir: Path,
    *,
    site: OutputSettings = OutputSettings(),
    created_at: datetime | None = None,
) -> WrittenFile:
    """The short "not applicable" SR of a rejected series: its reasons, no measurement, from headers only.

    It is the summary SR (``sr-summary.dcm``, shown as text by OHIF) of a result without ROIs
    or SEG. ``build_summary_sr`` reads only the source datasets of a ``CTSeries`` (evidence,
    patient and study), so the headers with a one-voxel placeholder volume are enough. Its
    UIDs are derived from the result like every other output, so a rewrite gives the same SR.
    """
    placeholder = Volume(np.zeros((1, 1, 1), dtype=np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    series = CTSeries(volume=placeholder, series_uid=files.series_uid, study_uid=result.study_uid,
                      datasets=files.headers, source_files=files.files)  # fmt: skip
    summary = build_summary_sr(series, result, None, output_uids(result, site.digest()), site,
                               created_at or datetime.now())  # fmt: skip
    return _write(_encoded(summary, SR_SUMMARY_FILE), out_dir)


def fit_character_set(dataset: Dataset) -> None:
    """Keep the source's SpecificCharacterSet unless one of our texts does not fit it; then use UTF-8.

    The site's texts (institution, disclaimer) and the reasons may hold characters the
    source's repertoire lacks (a series without (0008,0005) allows ASCII only). Values
    are held decoded, so switching the output to ISO_IR 192 keeps every character of the
    copied patient and study attributes. Code extensions (multi-valued character sets)
    are left as they are.
    """
    charset = dataset.get("SpecificCharacterSet") or ""
    if not isinstance(charset, str):
        return
    codec = "ascii" if charset in _DEFAULT_REPERTOIRE else python_encoding.get(charset)
    if codec is None:
        return
    for element in dataset.iterall():
        if element.VR not in _TEXT_VRS or element.value is None:
            continue
        values = element.value if isinstance(element.value, (list, tuple)) else [element.value]
        for value in values:
            text = str(value) if isinstance(value, (str, PersonName)) else ""
            try:
                text.encode(codec)
            except UnicodeEncodeError:
                logger.info(
                    "%s does not fit (0008,0005) '%s'; writing %s", element.keyword, charset, UTF8_CHARACTER_SET
                )
                _switch_to_utf8(dataset)
                return


def _switch_to_utf8(dataset: Dataset) -> None:
    """Set ISO_IR 192; person names are rebuilt from their text so they drop their old encoding."""
    dataset.SpecificCharacterSet = UTF8_CHARACTER_SET
    for element in dataset.iterall():
        if element.VR == "PN" and element.value is not None:
            if isinstance(element.value, (list, tuple)):
                element.value = [str(value) for value in element.value]
            else:
                element.value = str(element.value)


@dataclass(frozen=True)
class _Encoded:
    """One object encoded as a DICOM file, not yet written: its file name, bytes and File Meta."""

    name: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _encoded(dataset: Dataset, name: str) -> _Encoded:
    """``dataset`` as the bytes of a DICOM file named ``name`` (character set fitted first)."""
    fit_character_set(dataset)
    meta = dataset.file_meta  # set here as dcmwrite would, so what is returned is what the file holds
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    encoded = BytesIO()
    dataset.save_as(encoded, enforce_file_format=True)
    return _Encoded(name, encoded.getvalue(), str(meta.MediaStorageSOPClassUID),
                    str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID))  # fmt: skip


def _write(encoded: _Encoded, out_dir: Path) -> WrittenFile:
    """Write one encoded object durably (``durable_write``): never half a file."""
    path = out_dir / encoded.name
    durable_write(path, encoded.data)
    return WrittenFile(path, encoded.sop_class_uid, encoded.sop_instance_uid, encoded.transfer_syntax_uid)
