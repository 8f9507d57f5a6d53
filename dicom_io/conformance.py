"""What one CT file must hold before its pixels are decoded and its headers written back.

``check_header`` runs once per file on load, on the header alone, so that nothing is
allocated for a file that cannot give a faithful HU slice, and nothing reaches the
writers (highdicom) that they cannot encode. Every refusal names the tag, the observed
value and the expected one.

``complete_character_set`` declares a valid source character set the way the writers
accept it, without changing a single character of the text.

``check_frame`` confirms that compressed pixel data holds one whole frame before it is
decoded: a JPEG-LS decoder, given half a codestream, returns an image without complaint.

References
----------
DICOM PS3.3 C.7.6.3 (Image Pixel Module), C.8.2.1.1.3 (Photometric Interpretation of CT),
C.12.1.1.2 (Specific Character Set); PS3.5 6.2 (Value Representations), A.4 (Encapsulation);
ITU-T T.81 / T.87 / T.800 (JPEG, JPEG-LS, JPEG 2000: the EOI / EOC marker 0xFFD9).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from highdicom import SpecificCharacterSetValues
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_description, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.tag import BaseTag
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes
from pydicom.valuerep import VR

from liverfat.dicom_io.stacking import header_number, required_number, tag_label
from liverfat.errors import LiverfatError, Reason

__all__ = [
    "MAX_MATRIX",
    "MAX_VOLUME_BYTES",
    "ElementKey",
    "check_frame",
    "check_header",
    "check_volume_size",
    "complete_character_set",
]

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
MAX_MATRIX = 4096  # Rows and Columns; ultra-high-resolution CT stores 2048 x 2048
MAX_VOLUME_BYTES = 16 * 2**30  # the float32 HU volume: 1,000 slices of 2048 x 2048 fit
KNOWN_VRS = frozenset(vr.value for vr in VR)
ElementKey = tuple[object, ...]  # what decoding one encoded element depends on (``_element_key``)

DEFAULT_REPERTOIRE = ("", "ISO_IR 6")
ISO_2022 = "ISO 2022"
ISO_2022_DEFAULT = "ISO 2022 IR 6"  # what an empty value 1 of a multi-valued (0008,0005) means
MULTI_BYTE_SETS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"})
UTF8 = "ISO_IR 192"
WRITABLE_SETS = frozenset(value.value for value in SpecificCharacterSetValues)  # what highdicom accepts

MARKER_CODED_SYNTAXES = frozenset([*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes])
END_MARKER = b"\xff\xd9"  # JPEG and JPEG-LS EOI, JPEG 2000 EOC
FRAGMENT_PADDING = b"\x00"  # fragments have even length: an odd codestream ends with 00 (some pad more)


def check_header(header: Dataset, source: Path | str, decoded: set[ElementKey] | None = None) -> None:
    """Refuse a file whose header cannot give a faithful HU slice or valid outputs.

    ``decoded``, shared by the calls for the files of one series, remembers the encoded
    elements that decoded and passed (see ``_element_key``): an element with the same bytes in
    the same context decodes the same way, so it is not decoded again. Most of a series'
    header is the same in every file (about 11 of LIDC-IDRI-0002's ~87 elements differ);
    decoding every element of every file doubled the load of a 300-slice series.

    Raises
    ------
    LiverfatError
        ``INVALID_ATTRIBUTE`` (an element that cannot be decoded, a decimal string that is
        not finite, an unknown character set, a matrix out of range), ``MISSING_ATTRIBUTE``
        (no Study Instance UID, no Rescale Slope/Intercept) or ``NOT_CT`` (not one
        greyscale sample per pixel).
    """
    _check_elements(header, source, set() if decoded is None else decoded)
    _check_character_set(header, source)
    study_uid = str(header.get("StudyInstanceUID", "") or "")
    if not study_uid:
        raise LiverfatError(
            Reason.MISSING_ATTRIBUTE,
            f"{source}: {tag_label('StudyInstanceUID')} is {'empty' if 'StudyInstanceUID' in header else 'absent'}; "
            "expected a UID (a Type 1 attribute; the results join the source study)",
        )
    _check_pixel_module(header, source)


def complete_character_set(dataset: Dataset) -> None:
    """Declare the dataset's character set as the writers accept it; the text stays the same.

    An empty value 1 of a multi-valued (0008,0005) becomes ``ISO 2022 IR 6``, which is what
    it means; the default repertoire alone is left undeclared. A valid set that highdicom
    cannot declare (a single ISO 2022 value, Korean) becomes UTF-8 after the text is decoded.
    Unknown sets are left for ``check_header`` to report.
    """
    declared = _declared_sets(dataset)
    if not declared or any(value not in python_encoding for value in declared):
        return
    if all(value in DEFAULT_REPERTOIRE for value in declared):
        del dataset.SpecificCharacterSet
        return
    if len(declared) > 1 and not declared[0]:
        declared[0] = ISO_2022_DEFAULT
    if _writable(declared):
        dataset.SpecificCharacterSet = declared if len(declared) > 1 else declared[0]
        return
    dataset.decode()  # values are held as text from here on, so the declaration may change
    dataset.SpecificCharacterSet = UTF8


def check_volume_size(slices: int, rows: int, columns: int) -> None:
    """Refuse a volume larger than ``MAX_VOLUME_BYTES`` before it is allocated."""
    size = slices * rows * columns * np.dtype(np.float32).itemsize
    if size > MAX_VOLUME_BYTES:
        raise LiverfatError(
            Reason.VOLUME_TOO_LARGE,
            f"{slices} slices of {tag_label('Rows')} {rows} x {tag_label('Columns')} {columns} need "
            f"{size / 2**30:.1f} GiB as float32 HU; expected at most {MAX_VOLUME_BYTES / 2**30:.0f} GiB",
        )


def check_frame(dataset: Dataset, transfer_syntax: UID, source: Path | str) -> None:
    """Refuse encapsulated pixel data that is not exactly one whole JPEG-family frame.

    RLE declares its segment lengths and its decoders check them; JPEG, JPEG-LS and JPEG 2000
    codestreams end with the marker 0xFFD9, which a cut codestream lacks.
    """
    if not transfer_syntax.is_encapsulated or "PixelData" not in dataset:
        return
    try:
        frames = list(generate_frames(dataset.PixelData, number_of_frames=1))
    except Exception as exc:  # pydicom's parser of encapsulated items raises several exception types
        raise LiverfatError(
            Reason.DECODE_FAILED,
            f"{source}: {tag_label('PixelData')} is not encapsulated as {transfer_syntax.name} requires "
            f"({type(exc).__name__}: {exc}); expected an offset table item and fragment items (PS3.5 A.4)",
        ) from exc
    if len(frames) != 1:
        raise LiverfatError(
            Reason.DECODE_FAILED,
            f"{source}: {tag_label('PixelData')} holds {len(frames)} frames in its Basic Offset Table; "
            f"expected 1 ({tag_label('NumberOfFrames')} {header_number(dataset, 'NumberOfFrames') or 1:g})",
        )
    if transfer_syntax not in MARKER_CODED_SYNTAXES:
        return
    frame = frames[0]
    if not frame.rstrip(FRAGMENT_PADDING).endswith(END_MARKER):
        raise LiverfatError(
            Reason.DECODE_FAILED,
            f"{source}: the {transfer_syntax.name} frame in {tag_label('PixelData')} ends with bytes "
            f"{frame[-4:].hex(' ').upper()} after {len(frame)} bytes; expected the end marker FF D9 "
            "(truncated or corrupt compressed data)",
        )


def _element_key(dataset: Dataset, element: DataElement | RawDataElement,
                charset: tuple[str, ...]) -> ElementKey | None:  # fmt: skip
    """What decoding ``element`` of ``dataset`` depends on, or None when that is not known from the element alone.

    A raw element decodes from its tag, VR, length, bytes and encoding, the data set's character
    set (``charset``) and, for a private element, its block's private creator (which names the VR
    of an implicit one). A deferred or buffered element (no bytes here) or one already decoded is
    not keyed.
    """
    if not isinstance(element, RawDataElement) or element.value is None or element.is_buffered:
        return None
    tag = BaseTag(element.tag)
    creator = None
    if tag.is_private and not tag.is_private_creator:
        owner = dataset.get_item(BaseTag(tag.group << 16 | (tag.element >> 8)), keep_deferred=True)
        creator = None if owner is None else owner.value
    return (tag, element.VR, element.length, element.value, element.is_implicit_VR, element.is_little_endian,
            charset, creator)  # fmt: skip


def _check_elements(dataset: Dataset, source: Path | str, decoded: set[ElementKey]) -> None:
    """Every element must decode: a known VR, and no decimal string that is NaN or infinite.

    An element whose key is in ``decoded`` passed before; the key of each that passes is added.
    """
    charset = tuple(_declared_sets(dataset))
    for tag in list(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        vr = raw.VR
        if vr is not None and vr not in KNOWN_VRS:
            raise LiverfatError(
                Reason.INVALID_ATTRIBUTE,
                f"{source}: {_label(tag)} has value representation {vr!r}; expected one defined in PS3.5 6.2 "
                "(a corrupt or non-conformant file)",
            )
        key = _element_key(dataset, raw, charset)
        if key is not None and key in decoded:
            continue
        try:
            element = dataset[tag]
        except Exception as exc:  # pydicom's value converters raise many exception types
            raise LiverfatError(
                Reason.INVALID_ATTRIBUTE, f"{source}: {_label(tag)} cannot be decoded ({type(exc).__name__}: {exc})"
            ) from exc
        if element.VR == VR.SQ:
            for item in element.value:
                _check_elements(item, source, set())  # its own memo: an item's key would not name the parent's character set
        elif element.VR == VR.DS and not element.is_empty:
            values = element.value if element.VM > 1 else [element.value]
            bad = [value for value in values if value is not None and not math.isfinite(float(value))]
            if bad:
                raise LiverfatError(
                    Reason.INVALID_ATTRIBUTE, f"{source}: {_label(tag)} is {bad[0]}, expected a finite number"
                )
        if key is not None:
            decoded.add(key)


def _check_character_set(dataset: Dataset, source: Path | str) -> None:
    unknown = [value for value in _declared_sets(dataset) if value not in python_encoding]
    if unknown:
        raise LiverfatError(
            Reason.INVALID_ATTRIBUTE,
            f"{source}: {tag_label('SpecificCharacterSet')} names {unknown[0]!r}, which is no character set; "
            "expected a Defined Term of PS3.3 C.12.1.1.2 (e.g. 'ISO_IR 100', 'ISO_IR 192' or "
            "'\\ISO 2022 IR 87'), so that names and descriptions decode",
        )


def _check_pixel_module(header: Dataset, source: Path | str) -> None:
    photometric = str(header.get("PhotometricInterpretation", "") or "").strip()
    samples = header_number(header, "SamplesPerPixel")
    if photometric not in MONOCHROME or samples != 1:
        raise LiverfatError(
            Reason.NOT_CT,
            f"{source}: {tag_label('PhotometricInterpretation')} is {photometric or 'absent'!r} with "
            f"{tag_label('SamplesPerPixel')} {samples if samples is None else f'{samples:g}'}; expected "
            f"{' or '.join(MONOCHROME)} with 1 sample (a CT image is greyscale Hounsfield units)",
        )
    for keyword in ("Rows", "Columns"):
        size = required_number(header, keyword, source)
        if not 1 <= size <= MAX_MATRIX or size != int(size):
            raise LiverfatError(
                Reason.INVALID_ATTRIBUTE,
                f"{source}: {tag_label(keyword)} is {size:g}; expected a whole number from 1 to {MAX_MATRIX} "
                "(CT matrices are 512 to 2048 pixels across)",
            )
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        required_number(header, keyword, source)


def _declared_sets(dataset: Dataset) -> list[str]:
    value = dataset.get("SpecificCharacterSet")
    if value is None:
        return []
    return [str(v).strip() for v in ([value] if isinstance(value, str) else value)]


def _writable(declared: list[str]) -> bool:
    """Whether highdicom takes the declaration as it is (PS3.3 C.12.1.1.2 in its reading)."""
    if any(value not in WRITABLE_SETS for value in declared):
        return False
    if len(declared) == 1:
        return not declared[0].startswith(ISO_2022)
    return all(value.startswith(ISO_2022) for value in declared) and declared[0] not in MULTI_BYTE_SETS


def _label(tag: BaseTag) -> str:
    return f"{tag} '{dictionary_description(tag)}'" if keyword_for_tag(tag) else f"{tag} (not in the dictionary)"
