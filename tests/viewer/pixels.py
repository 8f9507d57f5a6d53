"""Judging screenshots by their pixels: is an image drawn, where is a circle, is an overlay there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# OHIF draws SR circles (DICOMSRDisplay tool) in pure green, rgb(0, 255, 0)
SR_GREEN_MIN = 180
SR_OTHER_MAX = 110


def load_rgb(path: Path | str) -> np.ndarray:
    """The screenshot as float ``(height, width, 3)``."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def region(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Pixels inside ``box`` = (left, top, width, height) in page coordinates, clipped to the image."""
    left, top, width, height = (int(round(v)) for v in box)
    return image[max(top, 0) : max(top + height, 0), max(left, 0) : max(left + width, 0)]


def mean_rgb(image: np.ndarray, xy: tuple[float, float], half: int = 3) -> np.ndarray:
    x, y = (int(round(v)) for v in xy)
    return image[y - half : y + half + 1, x - half : x + half + 1].reshape(-1, 3).mean(axis=0)


def grey_levels(pixels: np.ndarray) -> int:
    """How many distinct grey levels a region holds (a drawn CT has many, a blank canvas one)."""
    grey = pixels.mean(axis=-1).round().astype(int)
    return int(np.unique(grey).size)


@dataclass(frozen=True)
class Circle:
    centre: tuple[float, float]
    radius: float
    n_pixels: int


def _fit_circle(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (Kasa) circle through the points."""
    design = np.column_stack([xs, ys, np.ones_like(xs)])
    target = xs**2 + ys**2
    (a, b, c), *_ = np.linalg.lstsq(design, target, rcond=None)
    cx, cy = a / 2, b / 2
    return float(cx), float(cy), float(np.sqrt(c + cx**2 + cy**2))


def find_green_circle(image: np.ndarray, near: tuple[float, float], radius: float) -> Circle | None:
    """The SR circle drawn around ``near``: green pixels in an annulus of 0.5-1.6 ``radius``, fitted.

    The annulus leaves out the label text and most of its leader line, which start at the
    circle and run away from it.
    """
    green = (image[..., 1] >= SR_GREEN_MIN) & (image[..., 0] <= SR_OTHER_MAX) & (image[..., 2] <= SR_OTHER_MAX)
    ys, xs = np.nonzero(green)
    distance = np.hypot(xs - near[0], ys - near[1])
    keep = (distance >= 0.5 * radius) & (distance <= 1.6 * radius)
    if keep.sum() < 12:
        return None
    cx, cy, r = _fit_circle(xs[keep].astype(float), ys[keep].astype(float))
    return Circle((cx, cy), r, int(keep.sum()))


def overlay_shift(before: np.ndarray, after: np.ndarray, xy: tuple[float, float]) -> np.ndarray:
    """How much a point's colour changed between two screenshots (RGB difference of 7x7 means)."""
    return mean_rgb(after, xy) - mean_rgb(before, xy)


def tints_towards(shift: np.ndarray, rgb: tuple[int, int, int], minimum: float = 12.0) -> bool:
    """Whether a colour change is a blend towards ``rgb`` (not just brighter or darker grey)."""
    chroma = np.asarray(rgb, dtype=float) - np.mean(rgb)
    chroma_shift = shift - shift.mean()
    strength = float(np.dot(chroma_shift, chroma) / np.linalg.norm(chroma))
    return strength >= minimum


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(float).ravel() - a.mean()
    b = b.astype(float).ravel() - b.mean()
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / denominator) if denominator else 0.0


def displayed(image: np.ndarray, top_left: tuple[float, float], bottom_right: tuple[float, float],
              shape: tuple[int, int]) -> np.ndarray:
    """The part of a screenshot where an image of ``shape`` (rows, columns) is drawn, resampled to it."""
    (left, top), (right, bottom) = top_left, bottom_right
    box = (int(round(left)), int(round(top)), int(round(right)), int(round(bottom)))
    crop = Image.fromarray(image.astype(np.uint8)).crop(box).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(crop, dtype=np.float64)
