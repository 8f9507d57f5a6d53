"""Key image: what a radiologist sees in any viewer, even one that shows neither SEG nor SR.

A Secondary Capture (RGB) of the source slice with the most liver, in a soft-tissue
window (W400/L40), with the liver outline and the ROI circles drawn in the SEG's
recommended colours (circles of neighbouring slices are projected onto this slice and
drawn dashed), and a text panel below the image: the grade sentence (the same words as
the SR's Summary text), the ROI and volumetric figures, a legend and the site's
disclaimer. Small matrices are enlarged by an integer factor so the text stays legible.

Burned In Annotation is "NO": the burned-in text names no patient and no date, which is
what (0028,0301) is about (PS3.3 C.7.6.1.1.5); patient context travels in the header,
copied from the source slice by ``highdicom.sc.SCImage.from_ref_dataset``.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM
from scipy import ndimage

from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.seg import LIVER_RGB, roi_rgb
from liverfat.dicom_io.sr import grade_sentence, place_circle
from liverfat.dicom_io.uids import OutputUids, creation_kwargs, stamp_instance_creation
from liverfat.result import AnalysisResult, Grade

if TYPE_CHECKING:
    from liverfat.dicom_io.site import OutputSettings

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "liverfat key image"
WINDOW_CENTRE_HU = 40.0
WINDOW_WIDTH_HU = 400.0
MIN_WIDTH_PX = 512  # smaller slices are enlarged by an integer factor to at least this width
OUTLINE_PX = 2
HEADLINE_SCALE = 1.2
LINE_SPACING = 1.3
TEXT_RGB = (235, 235, 235)
MUTED_RGB = (170, 170, 170)
ALERT_RGB = (255, 200, 40)
PANEL_RGB = (0, 0, 0)
_DASH_DEG = 15
_LABEL_ANGLES_DEG = (-40.0, 0.0, 40.0)
_ORIENTATION_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # LPS axes: negative, positive


def key_slice_index(series: CTSeries, result: AnalysisResult) -> int:
    """The source slice with the most liver voxels (the middle slice when there is no liver)."""
    masks = result.source_masks
    if masks is not None and masks.liver.array.any():
        areas = masks.liver.array.reshape(masks.liver.array.shape[0], -1).sum(axis=1)
        return int(np.argmax(areas))
    return len(series.datasets) // 2


def patient_orientation(dataset: Dataset) -> tuple[str, str]:
    """(0020,0020) letters of the row and column directions (dominant axis of each)."""
    cosines = np.asarray([float(v) for v in dataset.ImageOrientationPatient]).reshape(2, 3)
    letters = []
    for direction in cosines:
        axis = int(np.argmax(np.abs(direction)))
        letters.append(_ORIENTATION_LETTERS[axis][int(direction[axis] > 0)])
    return letters[0], letters[1]


def _windowed(hu: np.ndarray) -> np.ndarray:
    low = WINDOW_CENTRE_HU - WINDOW_WIDTH_HU / 2
    return np.clip((hu.astype(np.float32) - low) / WINDOW_WIDTH_HU * 255.0, 0, 255).round().astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (Pillow >= 10.1 ships it; no font files needed)."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow without FreeType support: key image text needs Pillow >= 10.1 with FreeType")
    return font


def _wrap(text: str, font: ImageFont.FreeTypeFont, width_px: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width_px:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + ([current] if current else [])


def text_block(result: AnalysisResult, site: OutputSettings) -> list[tuple[str, tuple[int, int, int]]]:
    """The panel's paragraphs with their colours: grade, figures, legend, disclaimer, provenance."""
    if result.grade is Grade.MODERATE_TO_SEVERE:
        grade_colour = ALERT_RGB
    else:
        grade_colour = TEXT_RGB
    block = [(grade_sentence(result), grade_colour)]
    figures = []
    if result.rois:
        roi_means = ", ".join(f"{roi.mean_hu:.1f}" for roi in sorted(result.rois, key=lambda r: r.label))
        figures.append(f"ROIs 1-{len(result.rois)}: {roi_means} HU")
    if result.volumetric_hu is not None:
        figures.append(f"DL-volumetric {result.volumetric_hu:.1f} HU")
    if result.liver_volume_ml is not None:
        figures.append(f"liver volume {result.liver_volume_ml:.0f} ml")
    if figures:
        block.append(("; ".join(figures), TEXT_RGB))
    block.append(("Outline: liver. Circles: ROIs (dashed = on a neighbouring slice).", MUTED_RGB))
    block.append((site.disclaimer, TEXT_RGB))
    provenance = f"liverfat {result.software_version}; liver mask: {result.model.name} {result.model.version}"
    block.append((provenance, MUTED_RGB))
    return block


def _draw_liver_outline(rgb: np.ndarray, liver: np.ndarray, scale: int) -> None:
    enlarged = np.repeat(np.repeat(liver.astype(bool), scale, axis=0), scale, axis=1)
    outline = enlarged & ~ndimage.binary_erosion(enlarged, iterations=OUTLINE_PX)
    rgb[outline] = LIVER_RGB


def _draw_rois(image: Image.Image, series: CTSeries, result: AnalysisResult, k: int, scale: int, font_px: int) -> None:
    draw = ImageDraw.Draw(image)
    font = _font(font_px)
    half_slice_mm = series.volume.spacing[2] / 2
    placed = [(place_circle(series.datasets, roi.centre_lps, roi.radius_mm, slice_index=k), roi) for roi in result.rois]
    # projected (dashed) circles first, so a circle on this very slice is drawn on top
    placed.sort(key=lambda item: (abs(item[0].off_plane_mm) <= half_slice_mm, item[1].label))
    for circle, roi in placed:
        column, row = circle.centre
        cx, cy, r = column * scale, row * scale, circle.radius_px * scale
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = roi_rgb(roi.label)
        if abs(circle.off_plane_mm) <= half_slice_mm:
            draw.ellipse(box, outline=colour, width=OUTLINE_PX)
        else:
            for start in range(0, 360, 2 * _DASH_DEG):
                draw.arc(box, start, start + _DASH_DEG, fill=colour, width=OUTLINE_PX)
        # labels fan out on the circle's right so that coinciding circles stay readable
        angle = math.radians(_LABEL_ANGLES_DEG[(roi.label - 1) % len(_LABEL_ANGLES_DEG)])
        x = cx + (r + 4) * math.cos(angle)
        y = cy + (r + 4) * math.sin(angle)
        draw.text((x, y), str(roi.label), fill=colour, font=font, anchor="lm")


def render_key_image(series: CTSeries, result: AnalysisResult, site: OutputSettings) -> tuple[np.ndarray, int, int]:
    """The key image as RGB uint8 ``(rows, columns, 3)``, its source slice index, and the enlargement."""
    k = key_slice_index(series, result)
    grey = _windowed(series.volume.array[k])
    rows, columns = grey.shape
    scale = max(1, math.ceil(MIN_WIDTH_PX / columns))
    width, height = columns * scale, rows * scale
    rgb = np.asarray(Image.fromarray(grey).resize((width, height), Image.Resampling.BILINEAR).convert("RGB")).copy()
    if result.source_masks is not None:
        _draw_liver_outline(rgb, result.source_masks.liver.array[k], scale)
    font_px = int(np.clip(width // 36, 14, 28))
    slice_image = Image.fromarray(rgb)
    _draw_rois(slice_image, series, result, k, scale, font_px)

    margin = font_px // 2
    block = text_block(result, site)
    # the grade (first paragraph) is set larger than the rest
    fonts = [_font(round(font_px * HEADLINE_SCALE))] + [_font(font_px)] * (len(block) - 1)
    paragraphs = [
        (_wrap(text, font, width - 2 * margin), colour, font, int(font.size * LINE_SPACING))
        for (text, colour), font in zip(block, fonts)
    ]
    panel_px = sum(len(lines) * line_px for lines, _, _, line_px in paragraphs) + 2 * margin
    canvas = Image.new("RGB", (width, height + panel_px), PANEL_RGB)
    canvas.paste(slice_image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = height + margin
    for lines, colour, font, line_px in paragraphs:
        for line in lines:
            draw.text((margin, y), line, fill=colour, font=font)
            y += line_px
    return np.asarray(canvas), k, scale


def build_key_image(
    series: CTSeries, result: AnalysisResult, uids: OutputUids, site: OutputSettings, created: datetime
) -> hd.sc.SCImage:
    """The key image as a Secondary Capture in the source study."""
    rgb, k, scale = render_key_image(series, result, site)
    source = series.datasets[k]
    row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.series("keyimage"),
        series_number=site.keyimage_series_number,
        sop_instance_uid=uids.instance("keyimage"),
        instance_number=1,
        **site.equipment_kwargs(result.software_version),
        pixel_spacing=(row_spacing / scale, column_spacing / scale),  # type: ignore[arg-type]  # annotated as ints
        patient_orientation=patient_orientation(source),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        **creation_kwargs(created),
    )
    image.BurnedInAnnotation = "NO"
    # with a body part named, (0020,0060) Laterality is not required: the liver is unpaired
    image.BodyPartExamined = source.get("BodyPartExamined") or "LIVER"
    image.StationName = site.station_name
    image.DerivationDescription = (
        f"Soft-tissue window W{WINDOW_WIDTH_HU:g}/L{WINDOW_CENTRE_HU:g}, liver outline and ROIs drawn, "
        f"enlarged x{scale}, text panel below the image"
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    image.SourceImageSequence = [reference]
    image.DateOfSecondaryCapture = DA(created.date())
    image.TimeOfSecondaryCapture = TM(created.time())
    stamp_instance_creation(image, created)
    logger.info("key image %s from source slice %d (x%d)", image.SOPInstanceUID, k, scale)
    return image
