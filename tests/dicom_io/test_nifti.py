"""NIfTI input: RAS on disk, LPS in every Volume."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverfat.dicom_io.nifti import is_nifti, nifti_stem, read_nifti
from liverfat.errors import LiverfatError, Reason

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def nibabel_lps(image: nib.Nifti1Image, ijk: np.ndarray) -> np.ndarray:
    """LPS position of voxel indices according to nibabel's (RAS) affine: an independent reference."""
    return (RAS_TO_LPS @ (image.affine[:3, :3] @ ijk.T + image.affine[:3, 3:4])).T


def test_nifti_voxels_land_at_the_lps_position_of_their_ras_affine(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)  # nibabel: [i, j, k]
    affine = np.array([[-0.8, 0.0, 0.0, 120.0], [0.0, 0.0, 2.5, -40.0], [0.0, -0.9, 0.0, 300.0], [0.0, 0.0, 0.0, 1.0]])
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, tmp_path / "case_07.nii.gz")

    ct = read_nifti(tmp_path / "case_07.nii.gz")

    ijk = np.array([[0, 0, 0], [5, 0, 0], [0, 4, 3], [5, 4, 3], [2, 1, 2]], dtype=np.float64)
    assert np.allclose(ct.volume.to_lps(ijk), nibabel_lps(image, ijk), atol=1e-4)
    assert np.array_equal(ct.volume.array, data.transpose(2, 1, 0).astype(np.float32))
    assert ct.volume.array.dtype == np.float32
    assert ct.series_uid == "case_07" and ct.study_uid is None and not ct.is_dicom


def test_a_four_dimensional_nifti_is_not_readable_as_ct(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), dtype=np.int16), np.eye(4)), tmp_path / "time.nii")

    with pytest.raises(LiverfatError, match="expected a 3-D scalar image") as caught:
        read_nifti(tmp_path / "time.nii")
    assert caught.value.reason == Reason.NOT_READABLE


def test_a_corrupt_nifti_is_not_readable(tmp_path: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip at all")

    with pytest.raises(LiverfatError) as caught:
        read_nifti(tmp_path / "broken.nii.gz")
    assert caught.value.reason == Reason.NOT_READABLE and "broken.nii.gz" in caught.value.message


@pytest.mark.parametrize(("name", "stem"), [("a.nii.gz", "a"), ("B.NII", "B"), ("x.y.nii", "x.y")])
def test_nifti_names_are_recognised_and_stripped(name: str, stem: str) -> None:
    assert is_nifti(Path(name)) and nifti_stem(Path(name)) == stem


def test_real_nifti_ct_matches_nibabel_geometry(shared_data: Path) -> None:
    path = shared_data / "totalsegmentator-example" / "example_ct.nii.gz"
    image = nib.Nifti1Image.from_filename(path)

    ct = read_nifti(path)

    corners = np.array([[0, 0, 0], [s - 1 for s in image.shape]], dtype=np.float64)
    assert np.allclose(ct.volume.to_lps(corners), nibabel_lps(image, corners), atol=1e-3)
    assert np.array_equal(ct.volume.array, np.asarray(image.dataobj).transpose(2, 1, 0).astype(np.float32))
    assert ct.volume.spacing == pytest.approx((3.0, 3.0, 3.0))
