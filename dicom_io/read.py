"""Find CT series among input files and load one as an HU volume in LPS geometry.

Two steps, so that a caller can decide from headers alone before paying for pixels:

- ``discover`` reads headers only and groups DICOM files by SeriesInstanceUID (``read_series``
  does the same for the files of one series known in advance, such as the node's spool);
- ``load_series`` decodes one series, orders its slices by their position along the slice
  normal and builds the ``Volume``.

Geometry comes from Image Position (Patient), Image Orientation (Patient) and Pixel Spacing
only, never from InstanceNumber, SliceLocation or file names.

References
----------
DICOM PS3.3 C.7.6.2.1.1 (Image Position and Orientation), C.8.2.1 (CT Image Module).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
    generate_uid,
)

from liverfat.dicom_io.conformance import (
    ElementKey,
    check_frame,
    check_header,
    check_volume_size,
    complete_character_set,
)
from liverfat.dicom_io.filekinds import file_kind
from liverfat.dicom_io.masks import place_on_grid, read_mask_file
from liverfat.dicom_io.nifti import is_nifti, read_nifti
from liverfat.dicom_io.series import CTSeries, SeriesFiles, SkippedFile
from liverfat.dicom_io.stacking import (
    MAX_LISTED,
    SliceHeader,
    Stack,
    check_uniform,
    header_number,
    required_number,
    rounded,
    tag_label,
)
from liverfat.errors import Finding, LiverfatError, Reason
from liverfat.volume import Volume

__all__ = ["Discovery", "decode_hu", "discover", "load_series", "read_mask", "read_nifti", "read_series"]

log = logging.getLogger(__name__)

MULTIFRAME_CT_SOP_CLASSES = frozenset({EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})
CT_SOP_CLASSES = frozenset({CTImageStorage}) | MULTIFRAME_CT_SOP_CLASSES
CT_MODALITY = "CT"
LOCALIZER_IMAGE_TYPE = "LOCALIZER"

HEADER_DEFER_BYTES = 4096  # larger values (pixel data) are skipped, not read, by discover
PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF
RAW_DATASET_START = b"\x08\x00"  # group 0008 little endian: a dataset written without preamble
FILE_META_UIDS = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}
FOLDER_UID_SALT = "liverfat series without SeriesInstanceUID, grouped by folder"


@dataclass(frozen=True)
class Discovery:
    """What ``discover`` found: DICOM CT series, NIfTI files, and everything else with a reason."""

    series: tuple[SeriesFiles, ...]
    skipped: tuple[SkippedFile, ...]
    nifti: tuple[Path, ...] = ()


def discover(inputs: Sequence[Path]) -> Discovery:
    """Group the DICOM CT files under ``inputs`` (folders are searched recursively) by series.

    Reads headers only: pixel data is skipped, not read, except that its declared length is
    checked against the file size so truncated files are reported here. Files whose
    SeriesInstanceUID is empty are grouped by folder, under a UID derived from the folder's
    path; ``load_series`` reports this as a warning.
    """
    skipped: list[SkippedFile] = []
    dicom: list[Path] = []
    nifti: list[Path] = []
    for path in _input_files(inputs, skipped):
        (nifti if is_nifti(path) else dicom).append(path)
    groups = _group_by_series(dicom, skipped)
    series = tuple(_series_files(uid, members) for uid, members in sorted(groups.items()))
    log.debug("discovered %d series, %d NIfTI, %d skipped", len(series), len(nifti), len(skipped))
    return Discovery(series, _sorted(skipped), tuple(nifti))


def read_series(series_uid: str, files: Sequence[Path]) -> Discovery:
    """The ``SeriesFiles`` of ``files``, known to hold the one series ``series_uid``: ``discover`` without the search.

    Reads headers only, and reports a file that is missing, not DICOM, not CT or unreadable
    in ``skipped`` exactly as ``discover`` does; so is a file whose header names another
    series. ``series`` is empty when no file was a readable CT instance of the series.
    """
    skipped: list[SkippedFile] = []
    groups = _group_by_series(_input_files(files, skipped), skipped)
    members = groups.pop(series_uid, [])
    for others in groups.values():
        skipped += (SkippedFile(path, _other_series(path, header, series_uid)) for path, header in others)
    return Discovery((_series_files(series_uid, members),) if members else (), _sorted(skipped))


def load_series(series: SeriesFiles) -> CTSeries:
    """Decode a series into a float32 HU ``Volume`` with slices ordered along the slice normal.

    Raises
    ------
    LiverfatError
        With ``TOO_FEW_SLICES``, ``LOCALIZER``, ``MIXED_SIZES``, ``MISSING_ATTRIBUTE``,
        ``INVALID_ATTRIBUTE``, ``NOT_CT``, ``DUPLICATE_POSITIONS``, ``UNEVEN_SPACING``,
        ``GANTRY_TILT``, ``VOLUME_TOO_LARGE``, ``DECODE_FAILED``, ``NOT_READABLE`` or ``UNSUPPORTED_MULTIFRAME``:
        whatever stops a faithful volume or valid outputs (see ``conformance.check_header``,
        which runs on every header before any pixel memory is allocated).
    """
    members = _unique_instances(series)
    _check_image_type(members)
    decoded: set[ElementKey] = set()  # elements that passed, shared by the series' files: most are the same in all
    for path, header in members:
        check_header(header, path, decoded)
    slices = [SliceHeader.parse(path, header) for path, header in members]
    check_uniform(slices)
    stack = Stack.build(slices)
    datasets, array, duplicate_warnings = _read_pixels(stack.groups)
    volume = Volume(array, stack.spacing, stack.origin, stack.direction)
    study_uid = str(datasets[0].get("StudyInstanceUID", "") or "") or None
    warnings = (*_uid_warnings(series), *stack.warnings, *duplicate_warnings)
    for warning in warnings:
        log.info("series %s: %s", series.series_uid, warning.message)
    return CTSeries(
        volume=volume,
        series_uid=series.series_uid,
        study_uid=study_uid,
        datasets=tuple(datasets),
        source_files=tuple(group[0].path for group in stack.groups),
        warnings=warnings,
    )


def decode_hu(dataset: Dataset, source: Path | str = "", out: np.ndarray | None = None) -> np.ndarray:
    """The pixels of one single-frame CT dataset in HU (float32), via Rescale Slope/Intercept.

    ``source`` only names the file in error messages; ``out``, a float32 (Rows, Columns)
    array, receives the result without a temporary copy. Compressed data must hold one whole
    frame (``conformance.check_frame``): some decoders return an image from half a codestream.
    """
    where = f"{source}: " if source else ""
    meta = getattr(dataset, "file_meta", None)
    transfer_syntax = UID(str(meta.get("TransferSyntaxUID", "")) if meta is not None else "")
    check_frame(dataset, transfer_syntax, source or "dataset")
    try:
        stored, _ = get_decoder(transfer_syntax).as_array(dataset)
    except Exception as exc:  # pixel decoders are plugins that raise many exception types
        raise LiverfatError(
            Reason.DECODE_FAILED,
            f"{where}cannot decode pixel data with transfer syntax (0002,0010) "
            f"'{transfer_syntax.name or transfer_syntax}': {exc}",
        ) from exc
    if stored.ndim != 2 or (out is not None and stored.shape != out.shape):
        expected = "one greyscale frame" if out is None else f"{out.shape}"
        raise LiverfatError(
            Reason.DECODE_FAILED, f"{where}decoded pixel array has shape {stored.shape}; expected {expected}"
        )
    slope = required_number(dataset, "RescaleSlope", source)
    intercept = required_number(dataset, "RescaleIntercept", source)
    hu = np.empty(stored.shape, dtype=np.float32) if out is None else out
    np.multiply(stored, np.float32(slope), out=hu, dtype=np.float32)
    hu += np.float32(intercept)
    return hu


def read_mask(path: Path, reference: Volume, *, label: int | None = None) -> Volume:
    """A user's liver mask as a bool ``Volume`` on the grid of ``reference``.

    ``path`` is a NIfTI file, a DICOM SEG file (see ``masks.read_mask_file``, which also
    explains ``label``), or a folder holding one DICOM image series whose non-zero voxels are
    liver (the way 3D-IRCADb ships its manual masks; with ``label``, voxels of that value).
    Any grid: the mask is resampled nearest-neighbour onto ``reference`` through LPS
    coordinates.
    """
    if not path.is_dir():
        return read_mask_file(path, reference, label=label)
    found = discover([path])
    if len(found.series) != 1:
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"{path}: observed {len(found.series)} DICOM image series; expected exactly one mask series",
        )
    volume = load_series(found.series[0]).volume
    mask = volume.array > 0 if label is None else volume.array == label
    return place_on_grid(volume.with_array(mask), reference, path)


# ---------------------------------------------------------------------------------------
# discovery


def _input_files(inputs: Sequence[Path], skipped: list[SkippedFile]) -> list[Path]:
    files: dict[Path, Path] = {}  # resolved -> as given, so a file named twice is read once
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted(path for path in given.rglob("*") if path.is_file())
            if not found:
                skipped.append(SkippedFile(given, Finding(Reason.EMPTY_FOLDER, f"{given}: empty folder")))
        elif given.is_file():
            found = [given]
        else:
            skipped.append(SkippedFile(given, Finding(Reason.NOT_FOUND, f"{given}: no such file or folder")))
            continue
        for path in found:
            files.setdefault(path.resolve(), path)
    return sorted(files.values())


def _group_by_series(paths: Iterable[Path], skipped: list[SkippedFile]) -> dict[str, list[tuple[Path, Dataset]]]:
    """Each readable CT file's header under its SeriesInstanceUID (or its folder's UID); the rest to ``skipped``."""
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path in paths:
        header = _read_header(path)
        if isinstance(header, Finding):
            skipped.append(SkippedFile(path, header))
            continue
        uid = str(header.get("SeriesInstanceUID", "") or "") or _folder_uid(path.parent)
        groups.setdefault(uid, []).append((path, header))
    return groups


def _series_files(series_uid: str, members: Sequence[tuple[Path, Dataset]]) -> SeriesFiles:
    return SeriesFiles(series_uid, tuple(path for path, _ in members), tuple(header for _, header in members))


def _sorted(skipped: list[SkippedFile]) -> tuple[SkippedFile, ...]:
    return tuple(sorted(skipped, key=lambda s: s.path))


def _other_series(path: Path, header: Dataset, expected: str) -> Finding:
    uid = str(header.get("SeriesInstanceUID", "") or "")
    observed = f"'{uid}'" if uid else "empty"
    message = f"{path}: {tag_label('SeriesInstanceUID')} is {observed}; expected '{expected}'"
    return Finding(Reason.INVALID_ATTRIBUTE, message)


def _read_header(path: Path) -> Dataset | Finding:
    """The header of a CT file, or the reason it is not one."""
    try:
        header = _dcmread_header(path)
    except InvalidDicomError:
        kind = file_kind(path)
        return Finding(Reason.NOT_DICOM, f"{path}: not a DICOM file but {kind}" if kind else
                       f"{path}: not a DICOM file (no 'DICM' prefix after the 128-byte preamble)")  # fmt: skip
    except Exception as exc:  # pydicom raises many exception types on corrupt input
        return Finding(Reason.NOT_READABLE, f"{path}: DICOM header cannot be parsed ({type(exc).__name__}: {exc})")
    if header is None:
        return Finding(Reason.NOT_DICOM, f"{path}: not a DICOM file (no preamble and no recognisable dataset)")
    sop_class = UID(_uid(header, "SOPClassUID"))
    modality = str(header.get("Modality", "") or "")
    if sop_class not in CT_SOP_CLASSES and (sop_class or modality != CT_MODALITY):
        return Finding(
            Reason.NOT_CT,
            f"{path}: SOP Class UID (0008,0016) '{sop_class.name or sop_class or 'empty'}' with Modality "
            f"(0008,0060) '{modality}' is not a CT image; expected '{CTImageStorage.name}'",
        )
    problem = _pixel_data_problem(path, header)
    if problem is not None:
        return problem
    header = _drop_pixel_data(header)
    try:
        complete_character_set(header)
    except Exception as exc:  # pydicom raises many exception types decoding text
        return Finding(Reason.NOT_READABLE, f"{path}: text cannot be decoded ({type(exc).__name__}: {exc})")
    return header


def _dcmread_header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, defer_size=HEADER_DEFER_BYTES)
    except InvalidDicomError:
        with path.open("rb") as file:
            if file.read(len(RAW_DATASET_START)) != RAW_DATASET_START:
                raise
    header = pydicom.dcmread(path, defer_size=HEADER_DEFER_BYTES, force=True)
    return header if "SOPClassUID" in header or "Modality" in header else None


def _uid(dataset: Dataset, keyword: str) -> str:
    """A SOP Class/Instance UID, from the file meta when the dataset leaves it empty.

    Some exporters leave these UIDs empty in the dataset and write them only into the file
    meta (PS3.10 7.1), which holds the same values by definition.
    """
    value = str(dataset.get(keyword, "") or "")
    meta = getattr(dataset, "file_meta", None)
    return value or (str(meta.get(FILE_META_UIDS[keyword], "") or "") if meta is not None else "")


def _complete_from_file_meta(dataset: Dataset) -> None:
    """Fill empty SOP UIDs from the file meta and give a dataset read without meta its transfer syntax."""
    for keyword in FILE_META_UIDS:
        if not dataset.get(keyword) and _uid(dataset, keyword):
            setattr(dataset, keyword, _uid(dataset, keyword))
    meta = dataset.file_meta
    if "TransferSyntaxUID" not in meta and dataset.original_encoding[0] is not None:
        implicit, little = dataset.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )


def _pixel_data_problem(path: Path, header: Dataset) -> Finding | None:
    """A truncation finding when the Pixel Data (7FE0,0010) declares more bytes than its data set holds.

    In a Deflated Explicit VR Little Endian file (PS3.5 Section A.5) the element's position
    counts in the inflated data set, so that is the size compared, not the file's.
    """
    import zlib

    element = header.get_item(PIXEL_DATA, keep_deferred=True)
    size = path.stat().st_size
    syntax = UID(getattr(header, "file_meta", {}).get("TransferSyntaxUID", ""))
    if syntax.is_transfer_syntax and syntax.is_deflated:
        data_set_start = 128 + 4 + 12 + int(header.file_meta.get("FileMetaInformationGroupLength", 0))  # PS3.10 Section 7.1
        try:
            with path.open("rb") as file:
                file.seek(data_set_start)
                size = len(zlib.decompress(file.read(), -zlib.MAX_WBITS))  # as pydicom inflated it
        except zlib.error as error:
            return Finding(Reason.NOT_READABLE, f"{path}: deflated data set cannot be inflated ({error})")
    if element is None:
        return Finding(Reason.NOT_READABLE, f"{path}: no Pixel Data (7FE0,0010) in {size} bytes (truncated file?)")
    length, start = getattr(element, "length", 0), getattr(element, "value_tell", None)
    if length != UNDEFINED_LENGTH and start is not None and start + length > size:
        return Finding(
            Reason.NOT_READABLE,
            f"{path}: Pixel Data (7FE0,0010) declares {length} bytes but the file ends after "
            f"{size - start} (truncated file)",
        )
    return None


def _drop_pixel_data(header: Dataset) -> Dataset:
    del header[PIXEL_DATA]
    return header


def _folder_uid(folder: Path) -> str:
    return str(generate_uid(entropy_srcs=[FOLDER_UID_SALT, str(folder.resolve())]))


# ---------------------------------------------------------------------------------------
# header checks


def _unique_instances(series: SeriesFiles) -> list[tuple[Path, Dataset]]:
    """One (path, header) per SOP Instance UID; exact duplicate files are dropped silently."""
    seen: dict[str, Path] = {}
    members = []
    for path, header in zip(series.files, series.headers, strict=True):
        uid = _uid(header, "SOPInstanceUID") or str(path)
        if uid in seen:
            log.debug("%s duplicates instance %s in %s; dropped", path, uid, seen[uid])
            continue
        seen[uid] = path
        members.append((path, header))
    if not members:
        raise LiverfatError(Reason.TOO_FEW_SLICES, f"series {series.series_uid} has no files")
    return members


def _check_image_type(members: list[tuple[Path, Dataset]]) -> None:
    localizers = [path for path, header in members if LOCALIZER_IMAGE_TYPE in _image_type(header)]
    if localizers:
        raise LiverfatError(
            Reason.LOCALIZER,
            f"{len(localizers)} of {len(members)} files have Image Type (0008,0008) {LOCALIZER_IMAGE_TYPE} "
            f"(e.g. {localizers[0]}): scout images, not a stack of axial slices",
        )
    multiframe = [
        path
        for path, header in members
        if _uid(header, "SOPClassUID") in MULTIFRAME_CT_SOP_CLASSES
        or (header_number(header, "NumberOfFrames") or 1) > 1
    ]
    if multiframe:
        raise LiverfatError(
            Reason.UNSUPPORTED_MULTIFRAME,
            f"{multiframe[0]} is a multi-frame (Enhanced) CT image; expected one single-frame "
            f"'{CTImageStorage.name}' file per slice",
        )


def _image_type(header: Dataset) -> list[str]:
    value = header.get("ImageType", []) or []
    return [str(v).strip().upper() for v in ([value] if isinstance(value, str) else value)]


# ---------------------------------------------------------------------------------------
# pixels


def _read_pixels(groups: list[list[SliceHeader]]) -> tuple[list[Dataset], np.ndarray, list[Finding]]:
    """Decode one slice per position; other instances at that position must have identical pixels."""
    rows, columns = groups[0][0].shape
    check_volume_size(len(groups), rows, columns)
    array = np.empty((len(groups), rows, columns), dtype=np.float32)
    datasets = []
    duplicates: list[Path] = []
    for k, group in enumerate(groups):
        kept = _read_dataset(group[0].path)
        decode_hu(kept, group[0].path, out=array[k])
        datasets.append(kept)
        for other in group[1:]:
            hu = decode_hu(_read_dataset(other.path), other.path)
            if not np.array_equal(hu, array[k]):
                raise LiverfatError(
                    Reason.DUPLICATE_POSITIONS,
                    f"{group[0].path} and {other.path} lie at the same position {rounded(other.position)} "
                    f"but their pixels differ (largest difference {np.abs(hu - array[k]).max():.1f} HU); "
                    "expected one image per slice position",
                )
            duplicates.append(other.path)
    warnings = []
    if duplicates:
        warnings.append(
            Finding(
                Reason.DUPLICATE_POSITIONS,
                f"{len(duplicates)} instance(s) repeat the position and pixels of another slice and were left out "
                f"(e.g. {duplicates[0]})",
            )
        )
    return datasets, array, warnings


def _read_dataset(path: Path) -> Dataset:
    try:
        dataset = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many exception types on corrupt input
        raise LiverfatError(Reason.NOT_READABLE, f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    _complete_from_file_meta(dataset)
    complete_character_set(dataset)
    return dataset


def _uid_warnings(series: SeriesFiles) -> Iterable[Finding]:
    """Warnings for UIDs that were missing from the datasets (see ``_uid``)."""
    n = len(series.headers)
    no_sop_uid = sum(1 for h in series.headers if not h.get("SOPInstanceUID"))
    if no_sop_uid:
        yield Finding(
            Reason.MISSING_ATTRIBUTE,
            f"{tag_label('SOPInstanceUID')} is empty in {no_sop_uid} of {n} files; used "
            f"{tag_label('MediaStorageSOPInstanceUID')} from the file meta",
        )
    no_series_uid = sum(1 for h in series.headers if not h.get("SeriesInstanceUID"))
    if no_series_uid:
        folders = sorted({str(path.parent) for path in series.files})
        yield Finding(
            Reason.MISSING_ATTRIBUTE,
            f"{tag_label('SeriesInstanceUID')} is empty in {no_series_uid} of {n} files; grouped the files of "
            f"{', '.join(folders[:MAX_LISTED])} as one series, identified here as {series.series_uid}",
        )
