"""Series and hand-made analysis results for the DICOM output tests (SEG, SR, key image).

The results are built here, not by the analysis pipeline: a liver mask (the phantom's
analytic liver, or a real manual mask) and three circles placed with numpy on the
source grid, with their HU statistics measured on the source volume. The output
writers must then represent exactly these masks and circles.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom

from liverfat.dicom_io.read import discover, load_series
from liverfat.dicom_io.series import CTSeries
from liverfat.errors import Finding, Reason
from liverfat.result import AnalysisResult, Grade, Masks, ModelInfo, RoiMeasurement, RoiRule
from liverfat.volume import Volume
from tests.phantom import Grid, Phantom, write_series

ROI_RADIUS_MM = 8.0
MEDIAL_SHIFT_MM = 21.0
THRESHOLD_HU = 40.0
BORDERLINE_MARGIN_HU = 2.41
TEST_MODEL = ModelInfo(name="test-model", version="0.0-test", checksum="sha256:0", device="cpu")
SOFTWARE_VERSION = "0.1.0-test"
SMALL_GRID = Grid(rows=160, columns=160, pixel_spacing_mm=2.2, slice_positions_mm=tuple(np.arange(-50.0, 50.1, 2.5)))


def load(folder: Path) -> CTSeries:
    """The one CT series under ``folder``, read by the project's reader."""
    (series,) = discover([folder]).series
    return load_series(series)


def phantom_series(folder: Path, *, liver_hu: float = 55.0, grid: Grid = SMALL_GRID) -> tuple[CTSeries, np.ndarray]:
    """A phantom written as DICOM and read back, with its analytic liver mask in slice order."""
    phantom = Phantom().with_liver_hu(liver_hu)
    write_series(folder, phantom, grid)
    series = load(folder)
    points = np.stack([ds_points(ds) for ds in series.datasets])
    return series, phantom.liver_at(points)


def ds_points(dataset: pydicom.Dataset) -> np.ndarray:
    """LPS positions ``(rows, columns, 3)`` of every pixel centre of one slice."""
    position = np.asarray([float(v) for v in dataset.ImagePositionPatient])
    cosines = np.asarray([float(v) for v in dataset.ImageOrientationPatient]).reshape(2, 3)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    j, i = np.mgrid[0 : int(dataset.Rows), 0 : int(dataset.Columns)].astype(np.float64)
    return (
        position
        + i[..., None] * column_spacing * cosines[0]
        + j[..., None] * row_spacing * cosines[1]
    )


def reversed_series(series: CTSeries) -> CTSeries:
    """The same series with its slices in the opposite order (k runs against the normal)."""
    volume = series.volume
    direction = volume.direction.copy()
    direction[:, 2] *= -1
    last = volume.to_lps((0.0, 0.0, volume.array.shape[0] - 1.0))
    flipped = Volume(volume.array[::-1].copy(), volume.spacing, tuple(last), direction)
    return replace(series, volume=flipped, datasets=series.datasets[::-1], source_files=series.source_files[::-1])


def circle_pixels(dataset: pydicom.Dataset, centre_lps: np.ndarray, radius_mm: float) -> np.ndarray:
    """Pixels of one slice whose centres lie within ``radius_mm`` of ``centre_lps`` (in-plane)."""
    points = ds_points(dataset)
    return np.linalg.norm(points - centre_lps, axis=-1) <= radius_mm


def _roi_centre(dataset: pydicom.Dataset, liver_slice: np.ndarray) -> np.ndarray:
    """Where the DL-parenchymal method puts a circle: 21 mm medial of the liver's lateral edge.

    The lateral-most liver pixel is the one furthest to the patient's right (smallest LPS x;
    the most anterior of equals); the centre lies ``MEDIAL_SHIFT_MM`` from it towards the left.
    """
    points = ds_points(dataset)[liver_slice]
    lateral = points[np.lexsort((points[:, 1], points[:, 0]))[0]]
    return lateral + np.array([MEDIAL_SHIFT_MM, 0.0, 0.0])


def make_result(
    series: CTSeries,
    liver: np.ndarray,
    *,
    roi_offsets: tuple[int, ...] = (-2, 0, 2),
    spread_mm: float = 0.0,
    model: ModelInfo = TEST_MODEL,
    reasons: tuple[Finding, ...] = (),
    grade: Grade | None = None,
) -> AnalysisResult:
    """A result with ``liver`` as mask and circles on the largest liver slice and its neighbours.

    The circles lie at the same in-plane position, as the method's do, unless ``spread_mm``
    moves ROI n by ``(n - 2) * spread_mm`` down the columns (to tell them apart in pictures).
    """
    hu = series.volume.array
    areas = liver.reshape(liver.shape[0], -1).sum(axis=1)
    largest = int(np.argmax(areas))
    rois_map = np.zeros(liver.shape, dtype=np.uint8)
    rois = []
    for label, offset in enumerate(roi_offsets, start=1):
        k = largest + offset
        dataset = series.datasets[k]
        column_direction = np.asarray([float(v) for v in dataset.ImageOrientationPatient[3:]])
        centre = _roi_centre(dataset, liver[k]) + (label - 2) * spread_mm * column_direction
        inside = circle_pixels(dataset, centre, ROI_RADIUS_MM)
        rois_map[k][inside] = label
        values = hu[k][inside]
        pixel_area = float(dataset.PixelSpacing[0]) * float(dataset.PixelSpacing[1])
        rois.append(
            RoiMeasurement(
                label=label,
                slice_index=k,
                z_mm=float(centre[2]),
                centre_lps=(float(centre[0]), float(centre[1]), float(centre[2])),
                radius_mm=ROI_RADIUS_MM,
                area_mm2=float(inside.sum() * pixel_area),
                n_voxels=int(inside.sum()),
                mean_hu=float(values.mean()),
                sd_hu=float(values.std()),
                inside_liver_fraction=float(liver[k][inside].mean()),
            )
        )
    roi_values = [hu[roi.slice_index][rois_map[roi.slice_index] == roi.label] for roi in rois]
    parenchymal = float(np.mean(np.concatenate(roi_values)))
    if grade is None:
        grade = Grade.MODERATE_TO_SEVERE if parenchymal < THRESHOLD_HU else Grade.NONE_OR_MILD
    withheld = grade is Grade.NOT_GRADED
    graded = None if withheld else parenchymal
    voxel_ml = float(np.prod(series.volume.spacing)) / 1000.0
    geometry = series.volume
    return AnalysisResult(
        series_uid=series.series_uid,
        study_uid=series.study_uid,
        eligible=not withheld,
        reasons=reasons,
        grade=grade,
        threshold_hu=THRESHOLD_HU,
        parenchymal_hu=parenchymal,  # measured whether or not a grade rests on it, as the pipeline reports it
        graded_hu=graded,
        grade_basis="" if withheld else "the seed's three ROIs",
        borderline=graded is not None and abs(graded - THRESHOLD_HU) < BORDERLINE_MARGIN_HU,
        borderline_margin_hu=BORDERLINE_MARGIN_HU,
        volumetric_hu=float(hu[liver].mean()),
        axial_hu=float(hu[largest][liver[largest]].mean()),
        liver_volume_ml=float(liver.sum() * voxel_ml),
        rois=tuple(rois),
        warnings=(),
        model=model,
        software_version=SOFTWARE_VERSION,
        timings_s={"total": 1.0},
        source_masks=Masks(liver=geometry.with_array(liver.astype(bool)), rois=geometry.with_array(rois_map)),
    )


def not_graded(series: CTSeries, liver: np.ndarray) -> AnalysisResult:
    """A result whose grade was withheld, with its reason."""
    reason = Finding(Reason.IMAGE_SUGGESTS_CONTRAST, "aorta 180 HU suggests contrast enhancement (limit 100 HU)")
    return make_result(series, liver, reasons=(reason,), grade=Grade.NOT_GRADED)


def borderline(result: AnalysisResult, graded_hu: float) -> AnalysisResult:
    """``result`` graded on ``graded_hu`` (the seed's ROIs), flagged borderline as the pipeline would."""
    grade = Grade.MODERATE_TO_SEVERE if graded_hu < THRESHOLD_HU else Grade.NONE_OR_MILD
    return replace(result, grade=grade, parenchymal_hu=graded_hu, graded_hu=graded_hu,
                   borderline=abs(graded_hu - THRESHOLD_HU) < BORDERLINE_MARGIN_HU)  # fmt: skip


def with_replaced_roi(result: AnalysisResult, label: int = 2, rule: RoiRule = RoiRule.NEXT_SLICE,
                      shift_hu: float = -6.0) -> AnalysisResult:  # fmt: skip
    """``result`` whose ROI ``label`` replaced a seed ROI that failed its checks.

    The seed-exact DL-parenchymal stays; the graded value moves by ``shift_hu`` (the replaced
    ROI's share of it), as when the seed ROI lay on a vessel.
    """
    assert result.graded_hu is not None
    rois = tuple(replace(roi, rule=rule) if roi.label == label else roi for roi in result.rois)
    graded = result.graded_hu + shift_hu
    grade = Grade.MODERATE_TO_SEVERE if graded < THRESHOLD_HU else Grade.NONE_OR_MILD
    return replace(result, rois=rois, graded_hu=graded, grade=grade,
                   grade_basis=f"ROI {label} replaced ({rule.value}): the seed ROI lay on a vessel",
                   borderline=abs(graded - THRESHOLD_HU) < BORDERLINE_MARGIN_HU)  # fmt: skip


def ircadb_series(shared_data: Path) -> tuple[CTSeries, np.ndarray]:
    """3D-IRCADb-01 patient 1 and its manual liver mask (non-zero voxels), in slice order."""
    root = shared_data / "3dircadb-1.1"
    series = load(root / "PATIENT_DICOM")
    by_position = {}
    for path in sorted((root / "MASKS_DICOM" / "liver").iterdir()):
        mask = pydicom.dcmread(path)
        key = tuple(round(float(v), 2) for v in mask.ImagePositionPatient)
        by_position[key] = mask.pixel_array != 0
    liver = np.stack(
        [by_position[tuple(round(float(v), 2) for v in ds.ImagePositionPatient)] for ds in series.datasets]
    )
    return series, liver


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy``'s report that start with 'Error' (it reports on stderr)."""
    completed = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", check=False
    )
    return [line for line in completed.stderr.splitlines() if line.startswith("Error")]


def dciodvfy_available() -> bool:
    return shutil.which("dciodvfy") is not None

