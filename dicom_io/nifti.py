"""NIfTI input: the research data format of the seed method.

NIfTI stores its affine in RAS; SimpleITK's reader converts it to the LPS convention every
``Volume`` uses, so nothing here flips axes by hand.
"""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from liverfat.dicom_io.series import CTSeries
from liverfat.errors import LiverfatError, Reason
from liverfat.volume import Volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    """True for ``.nii`` and ``.nii.gz`` files (by name; the content is checked on reading)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """The file name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_nifti_image(path: Path, pixel_type: int = sitk.sitkUnknown) -> sitk.Image:
    """Read a 3-D NIfTI file as a SimpleITK image in LPS, or raise ``NOT_READABLE``."""
    try:
        image = sitk.ReadImage(str(path), pixel_type)
    except RuntimeError as exc:
        raise LiverfatError(Reason.NOT_READABLE, f"{path}: SimpleITK cannot read it as NIfTI ({exc})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise LiverfatError(
            Reason.NOT_READABLE,
            f"{path}: observed a {image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()} "
            "component(s) per voxel, expected a 3-D scalar image",
        )
    return image


def read_nifti(path: Path) -> CTSeries:
    """A NIfTI CT (values taken as HU) as a ``CTSeries`` without DICOM datasets.

    ``series_uid`` is the file name without ``.nii`` / ``.nii.gz``; ``study_uid`` is None.
    """
    return CTSeries(
        volume=Volume.from_sitk(read_nifti_image(path, sitk.sitkFloat32)),
        series_uid=nifti_stem(path),
        study_uid=None,
        source_files=(path,),
    )
