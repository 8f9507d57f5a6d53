"""Key image: what a radiologist sees in any viewer, even one that shows neither SEG nor SR.

A Secondary Capture (RGB) of the middle ROI's source slice (the largest liver slice of the
method; the slice with the most liver when there are no ROIs), in a soft-tissue
window (W400/L40), with the liver outline and the ROI circles drawn in the SEG's
recommended colours (circles of neighbouring slices are projected onto this slice and
drawn dashed), each labelled "ROI n" (a replacement says so: "ROI 2 (next slice)"), a
"BORDERLINE" badge when the graded value is within the method's error of the threshold,
and a text panel below the image: the grade sentence (the same words as the SR's Summary
text), what DL-parenchymal is in words with each ROI's mean, the volumetric figures, notes,
a legend and the site's disclaimer. The text names no DICOM tag: it is for a radiologist.
Small matrices are enlarged by an integer factor so the text stays legible.

The three ROIs lie 5 mm apart at nearly the same in-plane position, so their circles
project onto the key slice almost on top of each other. ``place_labels`` puts each label
where it overlaps no other label (and, where it can, no circle), trying positions around its
circle from near to far; a label set away from its circle gets a leader line.

Burned In Annotation is "NO": the burned-in text names no patient and no date, which is
what (0028,0301) is about (PS3.3 C.7.6.1.1.5); patient context travels in the header,
copied from the source slice by ``highdicom.sc.SCImage.from_ref_dataset``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
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
from liverfat.dicom_io.seg import LIVER_RGB, roi_name, roi_rgb
from liverfat.dicom_io.sr import grade_sentence, graded_value_differs, place_circle, without_tags
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
LABEL_STROKE_PX = 2  # dark outline around label text, legible on any grey
LABEL_GAP_PX = 4
BADGE_TEXT = "BORDERLINE: review the image"
_DASH_DEG = 15
# directions tried for a label, from the circle's right round both ways (image y runs down)
_LABEL_ANGLES_DEG = (0.0, -30.0, 30.0, -60.0, 60.0, -90.0, 90.0, 180.0, -150.0, 150.0, -120.0, 120.0)
_LABEL_RINGS = 6  # distances tried: the circle's edge, then one label height further each time
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_ORIENTATION_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # LPS axes: negative, positive


def key_slice_index(series: CTSeries, result: AnalysisResult) -> int:
    """The source slice of the middle ROI, else the one with the most liver voxels, else the middle slice.

    The middle ROI lies on the largest liver slice of the working grid (2.5 mm); the source
    slice with the most liver can be a neighbour of it on a thinner source grid, where every
    circle would be drawn dashed (projected). On the middle ROI's own slice it is drawn solid.
    """
    if result.rois:
        rois = sorted(result.rois, key=lambda r: r.label)
        middle = rois[(len(rois) - 1) // 2]
        return place_circle(series.datasets, middle.centre_lps, middle.radius_mm).slice_index
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


def _roi_figures(result: AnalysisResult) -> str:
    """DL-parenchymal in words, with each ROI's mean: what the number on top is made of.

    Areas are written "cm2": Pillow's built-in font has no superscript two.
    """
    rois = sorted(result.rois, key=lambda r: r.label)
    count = _NUMBER_WORDS.get(len(rois), str(len(rois)))
    area_cm2 = float(np.mean([roi.area_mm2 for roi in rois])) / 100.0
    across_mm = 2 * float(np.mean([roi.radius_mm for roi in rois]))
    name = "The graded value" if graded_value_differs(result) else "DL-parenchymal"
    means = ", ".join(f"{roi_name(roi)}: {roi.mean_hu:.1f}" for roi in rois)
    return (
        f"{name} = mean attenuation of {count} round liver ROIs, {across_mm:.0f} mm across ({area_cm2:.1f} cm2 "
        f"each), 5 mm apart: {means} HU"
    )


def text_block(result: AnalysisResult, site: OutputSettings) -> list[tuple[str, tuple[int, int, int]]]:
    """The panel's paragraphs with their colours: grade, figures, notes, legend, disclaimer, provenance.

    No paragraph names a DICOM tag (reasons and warnings are shown ``without_tags``).
    """
    alert = result.grade is Grade.MODERATE_TO_SEVERE or result.borderline
    block = [(grade_sentence(result), ALERT_RGB if alert else TEXT_RGB)]
    if result.rois:
        block.append((_roi_figures(result), TEXT_RGB))
    figures = []
    if result.volumetric_hu is not None:
        figures.append(f"DL-volumetric (mean over the whole liver mask) {result.volumetric_hu:.1f} HU")
    if result.liver_volume_ml is not None:
        figures.append(f"liver volume in view {result.liver_volume_ml:.0f} ml")
    if figures:
        block.append(("; ".join(figures), TEXT_RGB))
    if result.grade is not Grade.NOT_GRADED and graded_value_differs(result) and result.grade_basis:
        block.append((f"Grade basis: {without_tags(result.grade_basis)}", TEXT_RGB))
    for warning in result.warnings:
        block.append((f"Note: {without_tags(warning.message)}", TEXT_RGB))
    block.append(("Outline: liver. Circles: ROIs (solid on this slice, dashed on a neighbouring slice).", MUTED_RGB))
    block.append((site.disclaimer, TEXT_RGB))
    provenance = f"liverfat {result.software_version}; liver mask: {result.model.name} {result.model.version}"
    block.append((provenance, MUTED_RGB))
    return block


Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels


@dataclass(frozen=True)
class LabelSpot:
    """Where one circle's label goes: its box, and whether it needs a leader line to the circle."""

    box: Box
    leader: bool


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _covers_circle(box: Box, circle: tuple[float, float, float]) -> bool:
    cx, cy, r = circle
    nearest_x = min(max(cx, box[0]), box[2])
    nearest_y = min(max(cy, box[1]), box[3])
    return math.hypot(nearest_x - cx, nearest_y - cy) < r


def _candidate(circle: tuple[float, float, float], size: tuple[float, float], angle_deg: float,
               distance: float) -> Box:  # fmt: skip
    """The box of ``size`` whose nearest side faces the circle's centre at ``distance`` along ``angle_deg``."""
    cx, cy, _ = circle
    w, h = size
    ux, uy = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    ax, ay = cx + distance * ux, cy + distance * uy
    # anchor on the side facing the circle: a label to the right starts at the point, one above ends there
    left = ax - w * (1 - ux) / 2
    top = ay - h * (1 - uy) / 2
    return (left, top, left + w, top + h)


def place_labels(
    circles: Sequence[tuple[float, float, float]],
    sizes: Sequence[tuple[float, float]],
    bounds: tuple[float, float],
    gap: float = LABEL_GAP_PX,
) -> list[LabelSpot]:
    """Non-overlapping label boxes for ``circles`` ``(cx, cy, r)``, each of its ``sizes`` ``(w, h)``.

    Labels are placed in order. Each takes the first position around its circle (directions
    ``_LABEL_ANGLES_DEG``, distances from the edge outwards) whose box lies inside ``bounds``
    ``(width, height)``, overlaps no label placed before it and covers no circle; failing that,
    the first that overlaps no label. If some label finds no such place at all, every label is
    stacked in one column beside the circles instead, which never overlaps by construction.
    Boxes are padded by ``gap`` when tested, so placed labels are at least ``gap`` apart.
    """
    width, height = bounds
    placed: list[LabelSpot] = []
    for circle, size in zip(circles, sizes):
        spot = _first_free(circle, size, circles, [p.box for p in placed], (width, height), gap)
        if spot is None:
            return _stacked(circles, sizes, (width, height), gap)
        placed.append(spot)
    return placed


def _first_free(circle: tuple[float, float, float], size: tuple[float, float],
                circles: Sequence[tuple[float, float, float]], taken: list[Box],
                bounds: tuple[float, float], gap: float) -> LabelSpot | None:  # fmt: skip
    fallback = None
    for ring in range(_LABEL_RINGS):
        distance = circle[2] + gap + ring * (size[1] + gap)
        for angle in _LABEL_ANGLES_DEG:
            box = _candidate(circle, size, angle, distance)
            padded = (box[0] - gap, box[1] - gap, box[2] + gap, box[3] + gap)
            if box[0] < 0 or box[1] < 0 or box[2] > bounds[0] or box[3] > bounds[1]:
                continue
            if any(_overlaps(padded, other) for other in taken):
                continue
            spot = LabelSpot(box, leader=ring > 0)
            if not any(_covers_circle(box, other) for other in circles):
                return spot
            fallback = fallback or spot
    return fallback


def _stacked(circles: Sequence[tuple[float, float, float]], sizes: Sequence[tuple[float, float]],
             bounds: tuple[float, float], gap: float) -> list[LabelSpot]:  # fmt: skip
    """One label under the other in a column right of the circles (left of them if no room)."""
    right = max(cx + r for cx, _, r in circles) + gap
    widest = max(w for w, _ in sizes)
    left = right if right + widest <= bounds[0] else max(0.0, min(cx - r for cx, _, r in circles) - gap - widest)
    total = sum(h for _, h in sizes) + gap * (len(sizes) - 1)
    top = min(max(0.0, float(np.mean([cy for _, cy, _ in circles])) - total / 2), max(0.0, bounds[1] - total))
    spots = []
    for w, h in sizes:
        spots.append(LabelSpot((left, top, left + w, top + h), leader=True))
        top += h + gap
    return spots


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
    discs = []
    for circle, roi in placed:
        column, row = circle.centre
        cx, cy, r = column * scale, row * scale, circle.radius_px * scale
        discs.append((cx, cy, r))
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = roi_rgb(roi.label)
        if abs(circle.off_plane_mm) <= half_slice_mm:
            draw.ellipse(box, outline=colour, width=OUTLINE_PX)
        else:
            for start in range(0, 360, 2 * _DASH_DEG):
                draw.arc(box, start, start + _DASH_DEG, fill=colour, width=OUTLINE_PX)
    texts = [roi_name(roi) for _, roi in placed]
    sizes = [_text_size(text, font) for text in texts]
    spots = place_labels(discs, sizes, image.size)
    for (cx, cy, r), (_, roi), text, spot in zip(discs, placed, texts, spots):
        colour = roi_rgb(roi.label)
        left, top, right, bottom = spot.box
        if spot.leader:
            tx, ty = min(max(cx, left), right), min(max(cy, top), bottom)
            angle = math.atan2(ty - cy, tx - cx)
            draw.line([(cx + r * math.cos(angle), cy + r * math.sin(angle)), (tx, ty)], fill=colour, width=1)
        draw.text((left + LABEL_STROKE_PX, top + LABEL_STROKE_PX), text, fill=colour, font=font, anchor="lt",
                  stroke_width=LABEL_STROKE_PX, stroke_fill=PANEL_RGB)  # fmt: skip


def _text_size(text: str, font: ImageFont.FreeTypeFont) -> tuple[float, float]:
    """Width and height of ``text`` drawn from its top-left with the label stroke, stroke included."""
    left, top, right, bottom = font.getbbox(text, anchor="lt", stroke_width=LABEL_STROKE_PX)
    return float(right - left + 2 * LABEL_STROKE_PX), float(bottom - top + 2 * LABEL_STROKE_PX)


def _draw_badge(image: Image.Image, text: str, font_px: int) -> None:
    """An amber box with dark text in the image's top-left corner: a flag no reader misses."""
    draw = ImageDraw.Draw(image)
    font = _font(font_px)
    pad = max(4, font_px // 3)
    left, top, right, bottom = font.getbbox(text, anchor="lt")
    draw.rectangle((pad, pad, pad + right - left + 2 * pad, pad + bottom - top + 2 * pad), fill=ALERT_RGB)
    draw.text((2 * pad, 2 * pad), text, fill=PANEL_RGB, font=font, anchor="lt")


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
    if result.borderline:
        _draw_badge(slice_image, BADGE_TEXT, font_px)

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
