"""What our DICOM objects say should appear on screen, read back from the written files.

The viewer test compares OHIF's pixels with these: the ROI circles' centres and radii from
the SEG's ROI segments (not from the result object, so SEG and SR are checked against each
other), a point deep inside the liver, and a point of the body outside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from scipy import ndimage

from liverfat.dicom_io.series import CTSeries

ROI_SEGMENT_LABEL = re.compile(r"ROI (\d+)(?: \([a-z ]+\))?$")  # "ROI 2", "ROI 2 (next slice)"
LIVER_SEGMENT_LABEL = "Liver"
SOFT_TISSUE_MIN_HU = -100.0
RULER_MM = 10.0  # the "ruler" probe lies this far from the ROI centre along the rows, for the screen scale


@dataclass(frozen=True)
class RoiSlice:
    """An ROI segment's pixels on one CT slice: centroid in LPS and the radius of a disc of equal area."""

    sop_uid: str
    centre_lps: tuple[float, float, float]
    ruler_lps: tuple[float, float, float]  # RULER_MM from the centre along the rows: gives the screen scale
    equivalent_radius_mm: float

    @property
    def points(self) -> dict[str, tuple[float, float, float]]:
        return {"roi": self.centre_lps, "ruler": self.ruler_lps}


@dataclass(frozen=True)
class SegRoi:
    """One ROI segment of the SEG, on each CT slice it covers.

    The ROI is a disc on the 2.5 mm working grid; mapped back to a series with thinner
    slices it covers every source slice inside its slab, so usually more than one.
    """

    label: int
    segment_number: int
    slices: tuple[RoiSlice, ...]

    @property
    def primary(self) -> RoiSlice:
        """The slice where the ROI is largest (the first of equals)."""
        return max(self.slices, key=lambda s: s.equivalent_radius_mm)

    def on(self, sop_uid: str) -> RoiSlice | None:
        return next((s for s in self.slices if s.sop_uid == sop_uid), None)


@dataclass(frozen=True)
class SliceProbe:
    """Points on one CT slice: in the liver (away from the ROI), in an ROI, in the body outside the liver."""

    sop_uid: str
    points: dict[str, tuple[float, float, float]]


def pixel_to_lps(dataset: Dataset, row: float, column: float) -> tuple[float, float, float]:
    """LPS position of pixel (row, column) of a slice (pixel centres at integer indices)."""
    position = np.asarray([float(v) for v in dataset.ImagePositionPatient])
    cosines = np.asarray([float(v) for v in dataset.ImageOrientationPatient]).reshape(2, 3)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    lps = position + column * column_spacing * cosines[0] + row * row_spacing * cosines[1]
    return (float(lps[0]), float(lps[1]), float(lps[2]))


def _along_rows(dataset: Dataset, lps: tuple[float, float, float], mm: float) -> tuple[float, float, float]:
    row_cosine = np.asarray([float(v) for v in dataset.ImageOrientationPatient[:3]])
    moved = np.asarray(lps) + mm * row_cosine
    return (float(moved[0]), float(moved[1]), float(moved[2]))


def _segment_frames(seg: Dataset) -> dict[int, dict[str, np.ndarray]]:
    """Frames of each segment, keyed by the referenced CT SOP Instance UID."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    frames: dict[int, dict[str, np.ndarray]] = {}
    for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frames.setdefault(number, {})[str(source)] = pixels[index].astype(bool)
    return frames


def seg_rois(seg_path: Path, series: CTSeries) -> list[SegRoi]:
    """The ROI segments of our SEG, with their pixels on every CT slice they cover."""
    seg = pydicom.dcmread(seg_path)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    frames = _segment_frames(seg)
    rois = []
    for segment in seg.SegmentSequence:
        match = ROI_SEGMENT_LABEL.search(str(segment.SegmentLabel))
        if not match:
            continue
        number = int(segment.SegmentNumber)
        slices = []
        for sop, mask in frames.get(number, {}).items():
            if not mask.any():
                continue
            rows, columns = np.nonzero(mask)
            dataset = by_sop[sop]
            pixel_area = float(dataset.PixelSpacing[0]) * float(dataset.PixelSpacing[1])
            centre = pixel_to_lps(dataset, float(rows.mean()), float(columns.mean()))
            slices.append(
                RoiSlice(
                    sop_uid=sop,
                    centre_lps=centre,
                    ruler_lps=_along_rows(dataset, centre, RULER_MM),
                    equivalent_radius_mm=float(np.sqrt(mask.sum() * pixel_area / np.pi)),
                )
            )
        if not slices:
            raise AssertionError(f"ROI segment {number} ({segment.SegmentLabel}) is empty")
        rois.append(SegRoi(label=int(match.group(1)), segment_number=number, slices=tuple(slices)))
    return sorted(rois, key=lambda roi: roi.label)


def slice_probes(seg_path: Path, series: CTSeries, rois: list[SegRoi]) -> list[SliceProbe]:
    """On each ROI's main slice: the deepest liver point away from the ROI, the ROI centre and ruler, a body point."""
    seg = pydicom.dcmread(seg_path)
    liver_number = next(
        int(s.SegmentNumber) for s in seg.SegmentSequence if str(s.SegmentLabel) == LIVER_SEGMENT_LABEL
    )
    frames = _segment_frames(seg)
    liver_frames = frames[liver_number]
    by_sop = {str(ds.SOPInstanceUID): (k, ds) for k, ds in enumerate(series.datasets)}
    probes = []
    for roi in rois:
        primary = roi.primary
        k, dataset = by_sop[primary.sop_uid]
        liver = liver_frames[primary.sop_uid]
        in_roi = frames[roi.segment_number][primary.sop_uid]
        depth = ndimage.distance_transform_edt(liver & ~ndimage.binary_dilation(in_roi, iterations=15))
        liver_row, liver_column = np.unravel_index(int(np.argmax(depth)), depth.shape)
        body = series.volume.array[k] > SOFT_TISSUE_MIN_HU
        body = ndimage.binary_erosion(body, iterations=10)
        away = ndimage.distance_transform_edt(~liver) * body
        body_row, body_column = np.unravel_index(int(np.argmax(away)), away.shape)
        probes.append(
            SliceProbe(
                sop_uid=primary.sop_uid,
                points={
                    "liver": pixel_to_lps(dataset, float(liver_row), float(liver_column)),
                    **primary.points,
                    "body": pixel_to_lps(dataset, float(body_row), float(body_column)),
                },
            )
        )
    return probes
