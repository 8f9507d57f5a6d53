"""A user's liver mask file (``--mask``) placed on the grid of the CT it belongs to.

Two file forms are read here: a NIfTI label image (``.nii`` / ``.nii.gz``) on any grid, and a
DICOM SEG (its liver segment, or its only segment). ``read.read_mask`` adds the third form, a
folder holding a mask stored as a DICOM image series, and is the entry point for all three.

Every form becomes a ``Volume`` in LPS first and is then resampled nearest-neighbour onto the
reference grid through physical coordinates, so the mask may come from any grid.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from liverfat.dicom_io.nifti import is_nifti, read_nifti_image
from liverfat.errors import LiverfatError, Reason
from liverfat.volume import Volume

log = logging.getLogger(__name__)

# (coding scheme, code value) of "Liver" as Segmented Property Type; SRT is the retired scheme
# that older SEGs (for example dcmqi's) still use.
LIVER_CODES = frozenset({(codes.SCT.Liver.scheme_designator, codes.SCT.Liver.value), ("SRT", "T-62000")})
LIVER_LABEL = "liver"
FRACTION_THRESHOLD = 0.5  # a FRACTIONAL segment's voxel counts as liver from this occupancy
COVERAGE_WARNING = 0.95  # log when less of the mask's physical volume than this lands on the grid
# A mask made for this CT lies inside it and on soft tissue. Below MIN_COVERAGE of its volume inside
# the CT, or above MAX_OFF_TISSUE of its voxels on air, lung or bone, it was made for another CT or
# saved with another geometry: measuring under it would report "ROIs on vessels" or "contrast".
MIN_COVERAGE = 0.8
TISSUE_HU = (-200.0, 400.0)  # fatty to enhanced liver with noise; air, lung and cortical bone lie outside
MAX_OFF_TISSUE = 0.2
MISMATCH = "mask does not match the CT"
LABEL_OPTION = "--mask-label N"


def read_mask_file(path: Path, reference: Volume, *, label: int | None = None) -> Volume:
    """The liver mask in a NIfTI or DICOM SEG file as a bool ``Volume`` on the grid of ``reference``.

    Parameters
    ----------
    path
        A NIfTI file (``.nii`` / ``.nii.gz``) or a DICOM SEG file.
    reference
        The CT the mask belongs to (same patient space, LPS).
    label
        Which label is liver: a value of a NIfTI label image, or a SEG segment number.
        Without it a NIfTI must be binary (one non-zero value) and a SEG must have a
        segment coded or labelled liver, or a single segment.

    Raises
    ------
    LiverfatError
        ``MASK_MISMATCH`` when the mask is empty, ambiguous or does not overlap the reference;
        ``NOT_READABLE`` when ``path`` is neither form.
    """
    mask = _nifti_mask(path, label) if is_nifti(path) else _seg_mask(path, label)
    return place_on_grid(mask, reference, path)


def _nifti_mask(path: Path, label: int | None) -> Volume:
    volume = Volume.from_sitk(read_nifti_image(path))
    values = volume.array
    if label is not None:
        return volume.with_array(values == label)
    nonzero = values[values != 0]
    if nonzero.size and nonzero.min() != nonzero.max():
        labels = np.unique(nonzero)
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"{path}: observed {len(labels)} labels {labels[:10].tolist()}; expected a binary mask, "
            f"or name the liver label with {LABEL_OPTION}",
        )
    return volume.with_array(values != 0)


def _seg_mask(path: Path, label: int | None) -> Volume:
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom/highdicom raise many exception types on other files
        raise LiverfatError(
            Reason.NOT_READABLE,
            f"{path}: expected a NIfTI file, a DICOM SEG file or a folder holding a DICOM mask series ({exc})",
        ) from exc
    number = _liver_segment(seg, label, path)
    try:
        segment = seg.get_volume(segment_numbers=[number], combine_segments=False)
    except (ValueError, RuntimeError) as exc:
        raise LiverfatError(
            Reason.MASK_MISMATCH, f"{path}: the frames of segment {number} do not form a regular volume ({exc})"
        ) from exc
    # highdicom orders array axes and affine columns (slice, row, column); a Volume's are (i, j, k)
    array = segment.array[..., 0] >= FRACTION_THRESHOLD
    return Volume(array, segment.spacing[::-1], segment.position, segment.direction[:, ::-1])


def _liver_segment(seg: hd.seg.Segmentation, label: int | None, path: Path) -> int:
    numbers = list(seg.get_segment_numbers())
    if label is not None:
        if label not in numbers:
            raise LiverfatError(
                Reason.MASK_MISMATCH, f"{path}: observed segment numbers {numbers}; segment {label} is absent"
            )
        return label
    liver = [int(item.SegmentNumber) for item in seg.SegmentSequence if _is_liver(item)]
    if liver:
        if len(liver) > 1:
            log.warning("%s: segments %s all describe the liver; using segment %d", path, liver, liver[0])
        return liver[0]
    if len(numbers) == 1:
        return int(numbers[0])
    described = ", ".join(f"{item.SegmentNumber} '{item.SegmentLabel}'" for item in seg.SegmentSequence)
    raise LiverfatError(
        Reason.MASK_MISMATCH,
        f"{path}: observed segments {described}; expected one coded or labelled liver, or a single segment, "
        f"or name the liver segment with {LABEL_OPTION}",
    )


def _is_liver(item: Dataset) -> bool:
    coded = {
        (str(code.CodingSchemeDesignator), str(code.CodeValue))
        for code in item.get("SegmentedPropertyTypeCodeSequence", [])
    }
    return bool(coded & LIVER_CODES) or str(item.get("SegmentLabel", "")).strip().lower() == LIVER_LABEL


def place_on_grid(mask: Volume, reference: Volume, path: Path) -> Volume:
    """Nearest-neighbour resampling of a bool ``mask`` onto ``reference`` (a CT in HU) through LPS coordinates.

    ``path`` names the mask's source in messages. Raises ``MASK_MISMATCH`` ("mask does not match
    the CT") when the mask is empty, lies wholly or mostly outside the reference, or lies largely
    on air, lung or bone there: a mask of another CT, or one saved with another geometry.
    """
    if not mask.array.any():
        raise LiverfatError(Reason.MASK_MISMATCH, f"{path}: the mask is empty")
    target = reference.with_array(np.zeros(reference.array.shape, dtype=np.uint8)).to_sitk()
    moving = mask.with_array(mask.array.astype(np.uint8)).to_sitk()
    resampled = sitk.Resample(moving, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    placed = sitk.GetArrayFromImage(resampled).astype(bool)
    if not placed.any():
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"{path}: {MISMATCH}: the mask ({_extent(mask)} mm LPS) does not overlap the CT "
            f"({_extent(reference)} mm LPS)",
        )
    coverage = placed.sum() * _voxel_volume(reference) / (mask.array.sum() * _voxel_volume(mask))
    if coverage < MIN_COVERAGE:
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"{path}: {MISMATCH}: {100 * coverage:.0f}% of the mask's volume lies inside the CT, expected at least "
            f"{100 * MIN_COVERAGE:.0f}% (mask {_extent(mask)} mm LPS, CT {_extent(reference)} mm LPS)",
        )
    if coverage < COVERAGE_WARNING:
        log.warning("%s: only %.0f%% of the mask's volume lies inside the CT", path, 100 * coverage)
    hu = reference.array[placed]
    off_tissue = float(np.mean((hu < TISSUE_HU[0]) | (hu > TISSUE_HU[1])))
    if off_tissue > MAX_OFF_TISSUE:
        raise LiverfatError(
            Reason.MASK_MISMATCH,
            f"{path}: {MISMATCH}: {100 * off_tissue:.0f}% of its voxels lie on air, lung or bone (outside "
            f"{TISSUE_HU[0]:g} to {TISSUE_HU[1]:g} HU), expected at most {100 * MAX_OFF_TISSUE:.0f}%: a mask of "
            "another CT, or saved with another geometry?",
        )
    return reference.with_array(placed)


def _extent(volume: Volume) -> str:
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (np.asarray(volume.size) - 1)
    lps = volume.to_lps(corners)
    return " to ".join(str([round(float(v), 1) for v in bound]) for bound in (lps.min(axis=0), lps.max(axis=0)))


def _voxel_volume(volume: Volume) -> float:
    return float(abs(np.linalg.det(volume.affine[:3, :3])))
