"""``--save-ct``'s writer: dicom2nifti on the slices our reader kept, checked voxel by voxel on a real chest CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from liverfat.dicom_io.nifti_export import write_ct_nifti
from liverfat.dicom_io.read import discover, load_series


@pytest.mark.shared_data
def test_lidc_idri_0002_as_nifti_holds_the_same_hu_at_the_same_positions(shared_data: Path, tmp_path: Path) -> None:
    (files,) = discover([shared_data / "chest-ct" / "lidc-idri-0002"]).series
    series = load_series(files)

    image = sitk.ReadImage(str(write_ct_nifti(series, tmp_path / "ct.nii.gz")))

    volume = series.volume
    assert image.GetSize() == volume.size
    assert np.allclose(sorted(image.GetSpacing()), sorted(volume.spacing), atol=1e-4)
    saved = sitk.GetArrayFromImage(image)
    ijk = np.random.default_rng(1).integers(0, volume.size, size=(2000, 3))
    for (i, j, k), lps in zip(ijk, volume.to_lps(ijk)):
        x, y, z = image.TransformPhysicalPointToIndex(tuple(float(v) for v in lps))
        assert saved[z, y, x] == volume.array[k, j, i]
