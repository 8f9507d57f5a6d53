"""What the pixels say before any model runs: is this a CT in HU, and does it show the chest?

Two checks on a HU :class:`~liverfat.volume.Volume`, pure numpy (and scipy.ndimage), no I/O:

- :func:`not_ct_finding`: a CT in Hounsfield units shows air (outside the body, in the lungs)
  far below -500 HU, soft tissue between -100 and 200 HU, and many distinct values (noise
  spreads every tissue over many levels). A label map, a binary mask stored as an image, a
  probability map or an MR image fails at least one of these, and would otherwise be segmented
  and graded as if it were a CT: it gets ``NOT_CT_IMAGE``. Known limit: a reconstruction whose
  field of view lies wholly inside the abdomen (no air, no lung) fails too; the method needs a
  chest CT, which always shows the lungs.
- :func:`region_finding`: for a series whose headers name no body region, whether the image
  shows the lungs (a large volume of lung-density voxels *inside* the body) and the liver dome
  (the scan goes on well below the level where the right lung narrows over the diaphragm).
  ``REGION_FROM_IMAGE`` with the evidence when it does, ``NOT_CHEST`` with the evidence when not.

Where the thresholds come from: measured with these very functions' rules on every real CT in
``../shared/data`` (2026-12-07); each constant's comment gives the figures. Real CT series:
LIDC-IDRI-0002 (261 x 1.25 mm), Lung-PET-CT-Dx A0001 (64 x 5 mm) and A0002 (30 x 8 mm) whole
chests; three LIDC-IDRI partial chest slabs (11-16 slices); 3D-IRCADb-01 patient 1 (129 slices of
abdomen from just above the liver dome); the TotalSegmentator example CT (3 mm, abdomen and
pelvis, and its 30-slice crop) and its DICOM PET/CT slab; three CT colonography slices.
Non-CT images: TotalSegmentator's multi-label map ``example_seg`` (0..117, 41 labels and background) and
liver mask (0/1), the seed's liver mask (0/1), and 3D-IRCADb's liver mask stored as CT images (0/255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from liverfat.errors import Finding, Reason
from liverfat.volume import Volume

# --- is it a CT? ----------------------------------------------------------------------------------
SAMPLE_VOXELS = 2_000_000  # the intensity profile is taken on a regular sub-grid of at most this many voxels
AIR_OR_LUNG_BELOW_HU = -500.0
# Real CTs: 36 % (TotalSegmentator abdomen crop) to 71 % (Lung-PET-CT-Dx A0001) of voxels below -500 HU;
# every label map and mask: 0 %. 2 % still holds for a body that fills most of a small field of view.
MIN_AIR_OR_LUNG_FRACTION = 0.02
SOFT_TISSUE_HU = (-100.0, 200.0)  # fat to enhanced blood
# Real CTs: 18 % (a LIDC chest slab) to 53 % (TotalSegmentator abdomen crop) of voxels. Label maps pass
# this one (their labels are small integers); it catches images of air, or of bone and air only.
MIN_SOFT_TISSUE_FRACTION = 0.05
# Real CTs: 1,711 (TotalSegmentator 3 mm crop) to 2,598 (TotalSegmentator 3 mm CT) distinct values in the
# sample; the tests' phantoms (air plus noisy soft tissue, integer HU in DICOM) about 80; binary masks 2,
# label maps one per label (TotalSegmentator's example 42: those fail on air already). Fewer than 16 levels
# is a mask or a label map, whatever its range: -1000/50 'HU' has air and soft tissue but no noise.
MIN_DISTINCT_VALUES = 16
BONE_FROM_HU = 300.0  # reported only: a CT phantom without bone is still a CT; real CTs show 0.4-3 %

# --- does it show the chest and the liver dome? -------------------------------------------------------
BODY_ABOVE_HU = -500.0  # body tissue; per slice the largest connected piece, its holes filled, is the body
LUNG_HU = (-950.0, -500.0)  # aerated lung, inside the body; pure gas below -950 (bowel, trachea) is left out
IN_PLANE_STEP_MM = 2.5  # slices are looked at on a grid of about this pitch (fast, and enough for lungs)
# Whole chests: 2,450 ml (A0002, 8 mm slices), 5,009 ml (LIDC-IDRI-0002), 5,252 ml (A0001). An abdomen
# that starts above the liver dome shows the lung bases: 588 ml (3D-IRCADb-01); abdomen-pelvis 101 ml
# (TotalSegmentator); a 3-slice colonography 44 ml; LIDC partial chest slabs (3-4 cm of mid-chest)
# 253-841 ml. 1,000 ml sits between, with a margin on both sides.
MIN_LUNG_VOLUME_ML = 1000.0
RIGHT_LUNG_BASE_FRACTION = 0.5  # the right lung's base: where its cross-section falls below half its largest
# Whole chests extend 56 mm (A0002), 60 mm (A0001) and 66 mm (LIDC-IDRI-0002) below that level; the liver
# dome lies just under it. Partial chest slabs that stop in mid-lung: 0 mm.
MIN_BELOW_RIGHT_LUNG_BASE_MM = 30.0
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class IntensityProfile:
    """How a volume's values are spread; fractions are of the sampled voxels."""

    minimum: float
    maximum: float
    air_or_lung_fraction: float
    soft_tissue_fraction: float
    bone_fraction: float
    distinct_values: int

    def problems(self) -> list[str]:
        """Each failed CT criterion as 'observed, expected' (empty for a plausible CT)."""
        found = []
        if self.air_or_lung_fraction < MIN_AIR_OR_LUNG_FRACTION:
            found.append(f"{self.air_or_lung_fraction:.1%} of voxels below {AIR_OR_LUNG_BELOW_HU:g} HU, expected at "
                         f"least {MIN_AIR_OR_LUNG_FRACTION:.0%} (air around the body and in the lungs, near -1000 HU)")
        if self.soft_tissue_fraction < MIN_SOFT_TISSUE_FRACTION:
            low, high = SOFT_TISSUE_HU
            found.append(f"{self.soft_tissue_fraction:.1%} of voxels between {low:g} and {high:g} HU, expected at "
                         f"least {MIN_SOFT_TISSUE_FRACTION:.0%} (soft tissue)")
        if self.distinct_values < MIN_DISTINCT_VALUES:
            found.append(f"only {self.distinct_values} distinct values, expected at least {MIN_DISTINCT_VALUES} "
                         f"(noise alone gives a CT hundreds; a mask or label map has one per label)")
        return found

    def describe(self) -> str:
        low, high = SOFT_TISSUE_HU
        return (f"values {self.minimum:.0f} to {self.maximum:.0f} in {self.distinct_values} distinct levels; "
                f"{self.air_or_lung_fraction:.1%} below {AIR_OR_LUNG_BELOW_HU:g}, {self.soft_tissue_fraction:.1%} "
                f"in {low:g}..{high:g}, {self.bone_fraction:.1%} above {BONE_FROM_HU:g}")


def intensity_profile(volume: Volume) -> IntensityProfile:
    """The intensity profile of ``volume`` on a regular sub-grid (at most ``SAMPLE_VOXELS`` voxels)."""
    step = max(1, math.ceil((volume.array.size / SAMPLE_VOXELS) ** (1 / 3)))
    sample = np.asarray(volume.array[::step, ::step, ::step], dtype=np.float32).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return IntensityProfile(math.nan, math.nan, 0.0, 0.0, 0.0, 0)
    low, high = SOFT_TISSUE_HU
    return IntensityProfile(
        minimum=float(sample.min()),
        maximum=float(sample.max()),
        air_or_lung_fraction=float(np.mean(sample < AIR_OR_LUNG_BELOW_HU)),
        soft_tissue_fraction=float(np.mean((sample >= low) & (sample <= high))),
        bone_fraction=float(np.mean(sample >= BONE_FROM_HU)),
        distinct_values=int(np.unique(sample).size),
    )


def not_ct_finding(volume: Volume) -> Finding | None:
    """``NOT_CT_IMAGE`` when the values are not a plausible CT in HU, else None."""
    profile = intensity_profile(volume)
    problems = profile.problems()
    if not problems:
        return None
    return Finding(Reason.NOT_CT_IMAGE, f"the image is not a CT in Hounsfield units ({profile.describe()}): "
                                        f"{'; '.join(problems)}. A label map, mask or probability map "
                                        f"cannot be measured; give the CT image itself")


# --- body region ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionEvidence:
    """What the image shows of the chest.

    ``below_right_lung_base_mm`` is how far the scan extends below the lowest slice where the right
    lung still has at least ``RIGHT_LUNG_BASE_FRACTION`` of its largest cross-section; None when no
    right lung is seen at all.
    """

    lung_volume_ml: float
    right_lung_largest_cm2: float
    below_right_lung_base_mm: float | None

    @property
    def shows_lungs(self) -> bool:
        return self.lung_volume_ml >= MIN_LUNG_VOLUME_ML

    @property
    def shows_liver_dome(self) -> bool:
        below = self.below_right_lung_base_mm
        return below is not None and below >= MIN_BELOW_RIGHT_LUNG_BASE_MM

    def describe(self) -> str:
        lungs = (f"lung volume {self.lung_volume_ml:.0f} ml in the field of view "
                 f"(air-density tissue {LUNG_HU[0]:g} to {LUNG_HU[1]:g} HU inside the body); "
                 f"a chest CT shows at least {MIN_LUNG_VOLUME_ML:.0f} ml")
        if self.below_right_lung_base_mm is None:
            return f"{lungs}; no right lung seen"
        return (f"{lungs}; the scan extends {self.below_right_lung_base_mm:.0f} mm below the right lung base "
                f"(its cross-section under {RIGHT_LUNG_BASE_FRACTION:.0%} of the largest, "
                f"{self.right_lung_largest_cm2:.0f} cm2), at least {MIN_BELOW_RIGHT_LUNG_BASE_MM:.0f} mm "
                f"show the liver dome")


def region_evidence(volume: Volume) -> RegionEvidence:
    """Lung volume and extent below the right lung base, from an axial HU volume (LPS geometry)."""
    steps = [max(1, round(IN_PLANE_STEP_MM / s)) for s in volume.spacing[:2]]
    array = volume.array[:, :: steps[1], :: steps[0]]
    spacing = (volume.spacing[0] * steps[0], volume.spacing[1] * steps[1], volume.spacing[2])
    nk, nj, ni = array.shape
    # patient L (x) and S (z) of every sampled pixel: LPS = origin + direction @ (spacing * ijk)
    axes = volume.direction * np.asarray(spacing)[None, :]
    jj, ii = np.mgrid[0:nj, 0:ni]
    x_in_plane = volume.origin[0] + axes[0, 0] * ii + axes[0, 1] * jj
    lung_areas = np.zeros(nk)
    right_areas = np.zeros(nk)
    for k in range(nk):
        lung = _lung_pixels(np.asarray(array[k], dtype=np.float32))
        if lung is None:
            continue
        lung_pixels, body = lung
        x = x_in_plane + axes[0, 2] * k
        midline = float(x[body].mean())
        lung_areas[k] = lung_pixels.sum()
        right_areas[k] = (lung_pixels & (x < midline)).sum()  # LPS: the patient's right has the smaller L
    pixel_mm2 = spacing[0] * spacing[1]
    # S of each slice's centre: feet-first or head-first storage gives the same heights
    heights = volume.origin[2] + axes[2, 0] * (ni - 1) / 2 + axes[2, 1] * (nj - 1) / 2 + axes[2, 2] * np.arange(nk)
    return RegionEvidence(
        lung_volume_ml=float(lung_areas.sum() * pixel_mm2 * spacing[2] / 1000.0),
        right_lung_largest_cm2=float(right_areas.max(initial=0.0) * pixel_mm2 / 100.0),
        below_right_lung_base_mm=_below_base_mm(right_areas, heights),
    )


def region_finding(volume: Volume) -> Finding:
    """``REGION_FROM_IMAGE`` (a warning: accepted from the image) or ``NOT_CHEST``, with the evidence."""
    evidence = region_evidence(volume)
    if evidence.shows_lungs and evidence.shows_liver_dome:
        return Finding(Reason.REGION_FROM_IMAGE, f"no header names the body part; the image shows a chest "
                                                 f"down to the liver dome: {evidence.describe()}")
    missing = [what for what, seen in (("the lungs", evidence.shows_lungs),
                                       ("the liver dome", evidence.shows_liver_dome)) if not seen]
    return Finding(Reason.NOT_CHEST, f"no header names the body part, and the image does not show "
                                     f"{' and '.join(missing)}: {evidence.describe()}")


def _lung_pixels(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(lung, body) masks of one axial slice, or None when the slice holds no body."""
    labels, count = ndimage.label(hu > BODY_ABOVE_HU, structure=_EIGHT_CONNECTED)  # a thin chest wall stays whole
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    body = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    lung = body & (hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])
    return ndimage.binary_opening(lung), body  # opening drops the partial-volume rims around gas


def _below_base_mm(right_areas: np.ndarray, heights: np.ndarray) -> float | None:
    """How far the scan reaches below the right lung's base (see ``RegionEvidence``)."""
    largest = right_areas.max(initial=0.0)
    if largest <= 0:
        return None
    at_base = heights[right_areas >= RIGHT_LUNG_BASE_FRACTION * largest]
    return float(at_base.min() - heights.min())
