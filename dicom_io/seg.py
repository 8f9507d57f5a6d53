"""DICOM SEG of the liver and the parenchymal ROIs, on the source series' own grid.

Segments (BINARY, overlapping, so stacked rather than label-map encoded):

1. the liver (SCT Liver, anatomical structure);
2.. one segment per parenchymal ROI (reference region in the liver), numbered from the
   cranial ROI.

One segment per ROI rather than one for all three: OHIF (and 3D Slicer) list every
segment by its label with its own colour and visibility toggle, and OHIF jumps to a
segment's slices when it is clicked, so a radiologist can go to each circle and check
it on its own slice. Each ROI segment carries the same tracking identifier and UID as
its planar measurement group in the SR, which links the two objects. A ROI that replaced
a seed ROI which failed its checks says so in its label and tracking identifier
("Liver ROI 2 (next slice)"); its tracking UID stays that of ROI 2.

The SEG carries the site's disclaimer in Content Description (0070,0081), which is LO:
at most 64 characters, so a longer disclaimer is cut to its first sentence, or at a word
boundary with "...", to fit (``content_description``).

Frames that are empty are omitted (highdicom's default). The source images passed to
highdicom are the slices that hold any segment, in the series' own slice order (any
order works: highdicom takes each frame's position from its source image); the other
slices are referenced too, so the SEG references the whole series (``_reference_other_slices``).

Speed (300 slices of 512 x 512, 2 cores; ``bench/bench_write.py``): the constructor's
cost is its overlap check, a sum over the segment axis of the stacked array, and its
per-image work on every source image. The stacked array is handed over as a view of a
segment-major buffer, so a sum over the segment axis adds whole planes instead of four
bytes at a time; the overlap check itself runs on blocks of frames without highdicom's
full-size ``uint64`` sum (``_Segmentation``); and the slices without a segment are referenced directly
rather than through highdicom's ``further_source_images``, whose per-image IOD look-up and
frame matching cost about 2.5 ms a slice and can find nothing on a slice that holds no frame.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom import Dataset

from liverfat.dicom_io import codes
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.uids import OutputUids, creation_kwargs, frame_of_reference_fallback, stamp_instance_creation
from liverfat.errors import LiverfatError, Reason
from liverfat.result import USER_MASK, AnalysisResult, Masks, RoiMeasurement, RoiRule

if TYPE_CHECKING:
    from liverfat.dicom_io.site import OutputSettings

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "liverfat liver SEG"
LIVER_SEGMENT = 1
LIVER_TRACKING_ID = "liverfat liver"
ROI_ALGORITHM_NAME = "liverfat DL-parenchymal ROI placement"

#: Recommended display colours (sRGB), also used for the outlines on the key image.
LIVER_RGB = (235, 140, 52)
ROI_RGB = ((0, 215, 255), (90, 255, 90), (255, 95, 230))

_PIXEL_DATA_TAG = 0x7FE00010
CONTENT_DESCRIPTION_MAX_CHARS = 64  # (0070,0081) Content Description is LO
_OVERLAP_BLOCK = 16  # frames per block of the overlap check (16 x 512 x 512 x uint8: 4 MB)

#: How a replaced ROI is named, after its number; a seed ROI has no suffix.
RULE_WORDS = {RoiRule.SEED: "", RoiRule.NEXT_SLICE: "next slice", RoiRule.SHIFTED: "shifted"}


def roi_name(roi: RoiMeasurement) -> str:
    """``ROI 2``, or ``ROI 2 (next slice)`` / ``ROI 2 (shifted)`` for a replacement of a seed ROI."""
    words = RULE_WORDS[roi.rule]
    return f"ROI {roi.label} ({words})" if words else f"ROI {roi.label}"


def roi_tracking_id(label: int) -> str:
    """Base tracking identifier of ROI ``label``; its tracking UID is derived from this."""
    return f"liverfat liver ROI {label}"


def roi_tracking_label(roi: RoiMeasurement) -> str:
    """Tracking identifier of ``roi`` as written (SEG segment and SR group): says if it is a replacement."""
    return f"liverfat liver {roi_name(roi)}"


def content_description(disclaimer: str, limit: int = CONTENT_DESCRIPTION_MAX_CHARS) -> str:
    """The disclaimer fitted to an LO value: whole, else its first sentence, else cut at a word with "..."."""
    text = " ".join(disclaimer.split())
    if len(text) <= limit:
        return text
    first = text.split(". ")[0].rstrip(".") + "."
    if len(first) <= limit:
        return first
    cut = text[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:")
    return f"{cut}..."


def roi_rgb(label: int) -> tuple[int, int, int]:
    return ROI_RGB[(label - 1) % len(ROI_RGB)]


def roi_segment_numbers(result: AnalysisResult) -> dict[int, int]:
    """Segment number of each ROI label: consecutive after the liver, cranial first."""
    # Load-bearing order: label 1 is the cranial ROI, so segment numbers follow OHIF's
    # head-to-feet slice order. OHIF 3.13.2 drops an overlapping ROI segment whose slice
    # comes earlier in that order than the slice of a segment it has already loaded, so a
    # caudal-first numbering would lose ROI segments on screen (tests/viewer checks all three).
    labels = sorted(roi.label for roi in result.rois)
    return {label: LIVER_SEGMENT + 1 + index for index, label in enumerate(labels)}


def source_headers(series: CTSeries) -> list[Dataset]:
    """The source datasets without pixel data, with a FrameOfReferenceUID where they lack one.

    highdicom needs only the headers; leaving the pixel data out keeps memory small. A
    SEG requires a frame of reference; a source series without (0020,0052) gets one
    derived from its SeriesInstanceUID, so SEG, SR and key image agree with each other.
    """
    headers = []
    fallback = frame_of_reference_fallback(series.series_uid)
    missing = 0
    for dataset in series.datasets:
        # items() hands over elements as read (raw ones stay undecoded): 20x faster than iterating
        header = Dataset({tag: element for tag, element in dataset.items() if tag != _PIXEL_DATA_TAG})
        file_meta = getattr(dataset, "file_meta", None)
        if file_meta is not None:
            header.file_meta = file_meta
        if not header.get("FrameOfReferenceUID"):
            header.FrameOfReferenceUID = fallback
            missing += 1
        headers.append(header)
    if missing:
        logger.warning(
            "%d source slices lack (0020,0052) 'Frame of Reference UID'; outputs use %s", missing, fallback
        )
    return headers


def checked_masks(series: CTSeries, result: AnalysisResult) -> Masks:
    """The result's source-grid masks, after checking they fit the series slice for slice."""
    masks = result.source_masks
    if masks is None:
        raise LiverfatError(
            Reason.MASK_MISMATCH, f"result for series {result.series_uid} has no source-grid masks"
        )
    expected = series.volume.array.shape
    for name, volume in (("liver", masks.liver), ("rois", masks.rois)):
        if volume.array.shape != expected or len(series.datasets) != expected[0]:
            raise LiverfatError(
                Reason.MASK_MISMATCH,
                f"{name} mask has shape {volume.array.shape}, expected {expected} "
                f"({len(series.datasets)} source datasets)",
            )
    return masks


def _algorithm(name: str, version: str, family: hd.sr.CodedConcept) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=name, family=family, version=version)


def segment_descriptions(result: AnalysisResult, uids: OutputUids) -> list[hd.seg.SegmentDescription]:
    """Liver first, then one segment per ROI, with colours and tracking identifiers."""
    if result.model.name == USER_MASK.name:
        liver_algorithm = None
        liver_type = hd.seg.SegmentAlgorithmTypeValues.MANUAL
    else:
        liver_algorithm = _algorithm(result.model.name, result.model.version, codes.ARTIFICIAL_INTELLIGENCE)
        liver_type = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=LIVER_SEGMENT,
            segment_label="Liver",
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=codes.LIVER,
            algorithm_type=liver_type,
            algorithm_identification=liver_algorithm,
            tracking_id=LIVER_TRACKING_ID,
            tracking_uid=uids.tracking(LIVER_TRACKING_ID),
            display_color=hd.color.CIELabColor.from_rgb(*LIVER_RGB),
        )
    ]
    roi_algorithm = _algorithm(ROI_ALGORITHM_NAME, result.software_version, codes.MORPHOLOGICAL_OPERATIONS)
    by_label = {roi.label: roi for roi in result.rois}
    for label, number in roi_segment_numbers(result).items():
        roi = by_label[label]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"Liver {roi_name(roi)}",
                segmented_property_category=codes.SPATIAL_AND_RELATIONAL_CONCEPT,
                segmented_property_type=codes.REFERENCE_REGION,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=roi_algorithm,
                tracking_id=roi_tracking_label(roi),
                tracking_uid=uids.tracking(roi_tracking_id(label)),
                anatomic_regions=[codes.LIVER],
                display_color=hd.color.CIELabColor.from_rgb(*roi_rgb(label)),
            )
        )
    return descriptions


def _slices_with_rois(masks: Masks, labels: Sequence[int]) -> np.ndarray:
    """Per source slice: does it hold one of the ROIs ``labels``?

    The label test runs only on the slices with any ROI value: a few, not the whole volume.
    """
    rois = masks.rois.array
    candidates = np.flatnonzero(rois.reshape(len(rois), -1).any(axis=1))
    found = np.zeros(len(rois), dtype=bool)
    found[candidates] = np.isin(rois[candidates], labels).reshape(len(candidates), -1).any(axis=1)
    return found


def _stacked_segments(masks: Masks, labels: Sequence[int], slices: np.ndarray) -> np.ndarray:
    """``(len(slices), rows, columns, 1 + len(labels))`` uint8 0/1: liver, then each ROI.

    A view of a segment-major buffer (each segment's frames contiguous): a sum over the
    last axis then adds whole planes, and each frame highdicom encodes is one contiguous
    block. The buffer starts as untouched zeroed memory and is written only where a segment
    can be: the liver plane slice by slice (no copy of the selected slices) and each ROI
    plane on the few slices with a ROI. The ROI planes' other pages are never written, so a
    fresh worker does not pay the page faults of the whole buffer (300 slices: 287 MB, of
    which 72 MB are written).
    """
    liver, rois = masks.liver.array, masks.rois.array
    planes = np.zeros((1 + len(labels), len(slices), *liver.shape[1:]), dtype=np.uint8)
    for position, index in enumerate(slices):
        np.not_equal(liver[index], 0, out=planes[0, position])
    with_rois = np.any(rois.reshape(len(rois), -1), axis=1)
    positions = np.flatnonzero(with_rois[slices])
    for position, index in zip(positions.tolist(), slices[positions].tolist()):
        for plane, label in zip(planes[1:], labels):
            np.equal(rois[index], label, out=plane[position])
    return np.moveaxis(planes, 0, -1)


class _Segmentation(hd.seg.Segmentation):
    """highdicom's ``Segmentation`` whose overlap check of stacked binary segments needs no full-size copy.

    highdicom checks a stacked ``uint8`` array for overlapping segments with ``sum(axis=-1)``,
    which makes a ``uint64`` array eight times the size of one segment's frames (560 MB and
    0.4-1.3 s for 265 frames of 512 x 512). Here the same test, "does any pixel belong to more
    than one segment", runs on blocks of frames in ``uint8``, which cannot overflow with fewer
    than 256 segments. The array is checked for 0/1 values first, as highdicom does, and any
    other input (or a non-binary array, whose error highdicom raises) takes highdicom's own path.
    """

    @classmethod
    def _check_and_cast_pixel_array(
        cls,
        pixel_array: np.ndarray | hd.Volume,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray | hd.Volume, hd.seg.SegmentsOverlapValues]:
        if (
            not isinstance(pixel_array, np.ndarray)
            or pixel_array.ndim != 4
            or pixel_array.dtype != np.uint8
            or not 1 < pixel_array.shape[-1] == len(segment_numbers) < 256
            or segmentation_type != hd.seg.SegmentationTypeValues.BINARY
            or pixel_array.max() > 1
        ):
            return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)
        overlap = any(
            np.add.reduce(pixel_array[start : start + _OVERLAP_BLOCK], axis=-1, dtype=np.uint8).max() > 1
            for start in range(0, len(pixel_array), _OVERLAP_BLOCK)
        )
        return pixel_array, hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO


def _reference_other_slices(seg: hd.seg.Segmentation, others: Sequence[Dataset]) -> None:
    """Add the slices that hold no segment to the SEG's references, as ``further_source_images`` would.

    They go after the slices with frames in (0008,2112) 'Source Image Sequence' and in the
    source series' item of (0008,1115) 'Referenced Series Sequence', which is what highdicom
    writes for further source images of the same series. Its checks on them (same study,
    an image IOD) hold by construction: they are slices of the series whose other slices
    highdicom has just accepted as source images.
    """
    if not others:
        return
    references = []
    for header in others:
        reference = Dataset()
        reference.ReferencedSOPClassUID = header.SOPClassUID
        reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
        references.append(reference)
    seg.SourceImageSequence = [*seg.SourceImageSequence, *references]
    (source_series,) = [item for item in seg.ReferencedSeriesSequence
                        if item.SeriesInstanceUID == others[0].SeriesInstanceUID]  # fmt: skip
    source_series.ReferencedInstanceSequence = [*source_series.ReferencedInstanceSequence, *references]


def _fix_dimension_organization_uid(seg: hd.seg.Segmentation, uid: str) -> None:
    """Replace the random Dimension Organization UID highdicom generates by a derived one."""
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = uid


def build_seg(
    series: CTSeries, result: AnalysisResult, uids: OutputUids, site: OutputSettings, created: datetime
) -> hd.seg.Segmentation:
    """The SEG of ``result`` on ``series``' own grid.

    Raises
    ------
    LiverfatError
        ``MASK_MISMATCH`` when the masks do not fit the series; ``NO_LIVER`` when the liver
        mask is empty (a SEG needs at least one non-empty frame).
    """
    masks = checked_masks(series, result)
    occupied = masks.liver.array.reshape(len(series.datasets), -1).any(axis=1)
    if not occupied.any():
        raise LiverfatError(Reason.NO_LIVER, f"liver mask of series {series.series_uid} is empty; no SEG written")
    labels = sorted(roi_segment_numbers(result))
    occupied |= _slices_with_rois(masks, labels)
    slices = np.flatnonzero(occupied)
    headers = source_headers(series)
    seg = _Segmentation(
        source_images=[headers[k] for k in slices],
        pixel_array=_stacked_segments(masks, labels, slices),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(result, uids),
        series_instance_uid=uids.series("seg"),
        series_number=site.seg_series_number,
        sop_instance_uid=uids.instance("seg"),
        instance_number=1,
        **site.equipment_kwargs(result.software_version),
        content_label="LIVER",
        content_description=content_description(site.disclaimer),
        series_description=SERIES_DESCRIPTION,
        omit_empty_frames=True,
        **creation_kwargs(created),
    )
    _reference_other_slices(seg, [headers[k] for k in np.flatnonzero(~occupied)])
    seg.StationName = site.station_name
    stamp_instance_creation(seg, created)
    _fix_dimension_organization_uid(seg, uids.instance("seg-dimension-organization"))
    logger.info("SEG %s: %d frames from %d source slices", seg.SOPInstanceUID, seg.NumberOfFrames, len(slices))
    return seg
