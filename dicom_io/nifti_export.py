"""A DICOM CT series as NIfTI (``--save-ct``), written by dicom2nifti, the converter built for this job.

dicom2nifti reorients to LAS and applies the Modality LUT (HU); geometry comes from the
headers, so the file lines up with ``liver_mask.nii.gz`` and with the series in any viewer.
It orders slices by Instance Number, so a series whose numbers do not follow the slice
positions (which ``load_series`` accepts: it orders by position) is refused here with that reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom2nifti.convert_dicom import dicom_array_to_nifti  # type: ignore[import-untyped]
from dicom2nifti.exceptions import ConversionError, ConversionValidationError  # type: ignore[import-untyped]

from liverfat.dicom_io.series import CTSeries
from liverfat.dicom_io.stacking import tag_label
from liverfat.errors import LiverfatError, Reason
from liverfat.files import durable_path


def write_ct_nifti(series: CTSeries, path: Path) -> Path:
    """Write the slices ``series`` was built from (one per position, in order) to ``path`` (``.nii.gz``).

    Raises
    ------
    LiverfatError
        ``INVALID_ATTRIBUTE`` when Instance Numbers do not follow the slice order, ``NOT_READABLE``
        when dicom2nifti refuses the series otherwise; ``path`` is then left as it was.
    """
    if not series.is_dicom:
        raise ValueError("write_ct_nifti needs a DICOM series; a NIfTI input is its own CT file")
    _check_instance_order(series)
    with durable_path(path) as tmp:
        try:
            dicom_array_to_nifti(list(series.datasets), str(tmp), reorient_nifti=True)
        except (ConversionError, ConversionValidationError) as exc:
            message = f"dicom2nifti cannot convert series {series.series_uid}: {exc}"
            raise LiverfatError(Reason.NOT_READABLE, message) from exc
    return path


def _check_instance_order(series: CTSeries) -> None:
    numbers = [dataset.get("InstanceNumber") for dataset in series.datasets]
    steps = np.diff([int(n) for n in numbers if n is not None])
    if None in numbers or not (np.all(steps > 0) or np.all(steps < 0)):
        raise LiverfatError(
            Reason.INVALID_ATTRIBUTE,
            f"series {series.series_uid}: {tag_label('InstanceNumber')} is missing or does not follow the slice "
            "positions; dicom2nifti orders slices by it, so it cannot write this series as NIfTI",
        )
