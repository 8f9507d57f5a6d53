"""Write the DICOM outputs of one analysed series: SEG, two TID 1500 SRs and key image.

Every object joins the source study as a new series (patient and study attributes,
SpecificCharacterSet included, are copied from the source by highdicom), and every UID
is derived from the source series, the software version, the result and the site's
settings (see ``uids.py``), so writing the same result twice gives the same instances.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.valuerep import PersonName

from liverfat.dicom_io.errors import LiverfatError, Reason
from liverfat.dicom_io.keyimage import build_key_image
from liverfat.dicom_io.seg import build_seg, checked_masks
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.sr import build_circle_sr, build_summary_sr
from liverfat.dicom_io.uids import output_uids
from liverfat.result import AnalysisResult

logger = logging.getLogger(__name__)

SEG_FILE = "seg.dcm"
SR_FILE = "sr.dcm"  # the ROI circles (Imaging Measurement Report)
SR_SUMMARY_FILE = "sr-summary.dcm"  # grade, DL-parenchymal, liver; shown as text by OHIF
KEY_IMAGE_FILE = "keyimage.dcm"

UTF8_CHARACTER_SET = "ISO_IR 192"
_DEFAULT_REPERTOIRE = ("", "ISO_IR 6")
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})

DEFAULT_DISCLAIMER = (
    "For research / decision support only. Not a diagnosis: "
    "a radiologist must review the images and the measurement regions."
)


@dataclass(frozen=True)
class OutputSettings:
    """What a site configures about its outputs (text, identity of this node, series numbers).

    ``station_name`` doubles as the device observer's name in the SR; use the node's AE
    title. ``device_uid`` identifies this node as the SR's device observer; when None it
    is derived from ``station_name``, so it stays the same across restarts.
    """

    disclaimer: str = DEFAULT_DISCLAIMER
    manufacturer: str = "liverfat"
    model_name: str = "liverfat"
    station_name: str = "LIVERFAT"
    device_serial_number: str = "1"
    device_uid: str | None = None
    institution_name: str | None = None
    institutional_department_name: str | None = None
    seg_series_number: int = 9901
    sr_series_number: int = 9902
    keyimage_series_number: int = 9903
    sr_summary_series_number: int = 9904

    def __post_init__(self) -> None:
        limits = {"station_name": 16, "manufacturer": 64, "model_name": 64, "device_serial_number": 64,
                  "institution_name": 64, "institutional_department_name": 64}
        for name, limit in limits.items():
            value = getattr(self, name)
            if value is not None and not 0 < len(value) <= limit:
                raise ValueError(f"output setting {name}={value!r} must have 1 to {limit} characters")
        for name in ("seg_series_number", "sr_series_number", "keyimage_series_number", "sr_summary_series_number"):
            if not 0 < getattr(self, name) < 2**31:
                raise ValueError(f"output setting {name}={getattr(self, name)} must be a positive integer below 2**31")

    def digest(self) -> str:
        """SHA-256 of every setting: a changed disclaimer or identity gives new UIDs."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def write_outputs(
    series: CTSeries,
    result: AnalysisResult,
    out_dir: Path,
    *,
    site: OutputSettings = OutputSettings(),
    created_at: datetime | None = None,
) -> list[Path]:
    """Write ``seg.dcm``, ``sr.dcm``, ``sr-summary.dcm`` and ``keyimage.dcm`` into ``out_dir``.

    The SEG is written only when the result has a non-empty liver mask (the summary SR
    then references it); the circle SR (``sr.dcm``) only when the result has ROIs. The
    summary SR and the key image are always written, and say why when the grade was
    withheld. OHIF draws the circle SR's ROIs on the CT and shows the summary SR as text.
    ``created_at`` stamps content and creation dates (default: now); pass the job's
    first processing time to make rewrites byte-identical.

    Returns
    -------
    list[Path]
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
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    has_liver = result.source_masks is not None and bool(result.source_masks.liver.array.any())
    seg = build_seg(series, result, uids, site, created) if has_liver else None
    if seg is not None:
        written.append(_save(seg, out_dir / SEG_FILE))
    else:
        logger.info("series %s: no liver mask, no SEG", series.series_uid)
    if result.rois:
        written.append(_save(build_circle_sr(series, result, uids, site, created), out_dir / SR_FILE))
    else:
        logger.info("series %s: no ROIs, no circle SR", series.series_uid)
    written.append(_save(build_summary_sr(series, result, seg, uids, site, created), out_dir / SR_SUMMARY_FILE))
    written.append(_save(build_key_image(series, result, uids, site, created), out_dir / KEY_IMAGE_FILE))
    return written


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


def _save(dataset: Dataset, path: Path) -> Path:
    """Write via a temporary name and rename, so a crash never leaves half a file."""
    fit_character_set(dataset)
    partial = path.with_name(path.name + ".partial")
    dataset.save_as(partial, enforce_file_format=True)
    partial.replace(path)
    return path
