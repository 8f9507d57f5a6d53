"""``preview.png``: the key image's picture as a PNG file, for DICOM and NIfTI inputs alike.

The picture is ``keyimage.render_key_image``'s (the same slice, outline, ROI circles and text
panel as the Secondary Capture sent to PACS), so a research user sees what a radiologist sees.
The key image is drawn on the source slices as DICOM stores them; a NIfTI volume is first
turned to the DICOM axial orientation (rows run anterior to posterior, columns right to left,
slices foot to head) so its preview is not upside down or mirrored.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset

from liverfat.dicom_io.keyimage import render_key_image
from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.site import OutputSettings
from liverfat.files import durable_write
from liverfat.result import AnalysisResult, Masks
from liverfat.volume import Volume

DICOM_AXIAL = "LPS"  # SimpleITK's name for i -> patient left, j -> posterior, k -> head


def write_preview(series: CTSeries, result: AnalysisResult, path: Path, site: OutputSettings) -> Path:
    """Render the key image of ``series`` and ``result`` and write it to ``path`` as PNG; returns ``path``."""
    if not series.is_dicom:
        series, result = _as_dicom_axial(series, result)
    rgb, _, _ = render_key_image(series, result, site)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    durable_write(path, buffer.getvalue())
    return path


def _as_dicom_axial(series: CTSeries, result: AnalysisResult) -> tuple[CTSeries, AnalysisResult]:
    """A NIfTI series and its masks turned to DICOM axial order, with one plane header per slice.

    The key image places ROI circles (LPS positions) through each slice's Image Position and
    Orientation (Patient) and Pixel Spacing; the headers made here hold those three, from the volume.
    """
    volume = _reoriented(series.volume)
    planes = tuple(_plane(volume, k) for k in range(volume.size[2]))
    masks = result.source_masks
    if masks is not None:
        liver = _reoriented(masks.liver.with_array(masks.liver.array.astype(np.uint8)))
        masks = Masks(liver=liver.with_array(liver.array.astype(bool)), rois=_reoriented(masks.rois))
    return replace(series, volume=volume, datasets=planes), replace(result, source_masks=masks)


def _reoriented(volume: Volume) -> Volume:
    """The same voxels with axes permuted and flipped to the nearest DICOM axial orientation."""
    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), DICOM_AXIAL))


def _plane(volume: Volume, k: int) -> Dataset:
    """The plane attributes of slice ``k`` (PS3.3 C.7.6.2): position of its first voxel, row and column axes."""
    plane = Dataset()
    plane.ImagePositionPatient = [float(v) for v in volume.to_lps([0.0, 0.0, float(k)])]
    plane.ImageOrientationPatient = [float(v) for v in (*volume.direction[:, 0], *volume.direction[:, 1])]
    plane.PixelSpacing = [volume.spacing[1], volume.spacing[0]]  # between rows (along j), then columns (along i)
    return plane
