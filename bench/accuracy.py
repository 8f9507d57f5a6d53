"""Segmentation accuracy of a model against reference masks, and what it does to the HU figures.

For each (CT, reference liver mask) pair: Dice, HD95, average symmetric surface distance, volume
difference, and the DL-parenchymal / DL-volumetric / DL-axial difference between the model's mask
and the reference mask, all on the 0.7 x 0.7 x 2.5 mm working grid the method measures on.

    .venv/bin/python bench/accuracy.py                 # the real cases in ../shared/data
    .venv/bin/python bench/accuracy.py --model PATH    # another model (nnU-Net v2 folder or store name)

The seed's figures for comparison (615 test scans, its nnU-Net v1 model): liver Dice 0.966
(minimum 0.790); DL-parenchymal vs manual ROI MAE 2.41 HU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from liverfat.dicom_io.read import discover, load_series, read_mask, read_nifti
from liverfat.dicom_io.series import CTSeries
from liverfat.inference.models.registry import load_backend
from liverfat.inference.pipeline import measure_series
from liverfat.result import AnalysisResult

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEED_FIGURES = "seed (615 scans, nnU-Net v1): Dice 0.966 mean, 0.790 min; DL-parenchymal vs manual ROI MAE 2.41 HU"


@dataclass(frozen=True)
class Case:
    name: str
    ct: Path
    reference: Path
    label: int | None = None  # the liver's value in a multi-label reference
    reference_kind: str = "manual"


CASES = (
    Case("3D-IRCADb 1.1 patient 1", SHARED_DATA / "3dircadb-1.1/PATIENT_DICOM", SHARED_DATA / "3dircadb-1.1/MASKS_DICOM/liver"),
    Case("TotalSegmentator example (30 slices)", SHARED_DATA / "totalsegmentator-example/example_ct_sm.nii.gz",
         SHARED_DATA / "totalsegmentator-example/example_seg.nii.gz", label=5, reference_kind="TotalSegmentator"),
)  # fmt: skip


def load_ct(path: Path) -> CTSeries:
    if path.is_file() and path.name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    (series,) = discover([path]).series
    return load_series(series)


def surface_distances_mm(a: np.ndarray, b: np.ndarray, spacing_kji: tuple[float, float, float]) -> np.ndarray:
    """Distances from every surface voxel of ``a`` to the surface of ``b`` and back, in mm."""

    def surface(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask)

    surface_a, surface_b = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing_kji)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing_kji)
    return np.concatenate([to_b[surface_a], to_a[surface_b]])


def compare(predicted: AnalysisResult, reference: AnalysisResult) -> dict[str, float | None]:
    if predicted.working_masks is None or reference.working_masks is None:
        raise ValueError("both results need their working-grid masks")
    pred = predicted.working_masks.liver.array.astype(bool)
    ref = reference.working_masks.liver.array.astype(bool)
    spacing = predicted.working_masks.liver.spacing
    distances = surface_distances_mm(pred, ref, (spacing[2], spacing[1], spacing[0]))

    def difference(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 2)

    return {
        "dice": round(2 * float((pred & ref).sum()) / float(pred.sum() + ref.sum()), 4),
        "hd95_mm": round(float(np.percentile(distances, 95)), 2),
        "assd_mm": round(float(distances.mean()), 2),
        "volume_ml": predicted.liver_volume_ml,
        "reference_volume_ml": reference.liver_volume_ml,
        "volume_difference_pct": round(100 * (predicted.liver_volume_ml or 0) / (reference.liver_volume_ml or 1) - 100, 1),
        "parenchymal_hu": predicted.parenchymal_hu,
        "reference_parenchymal_hu": reference.parenchymal_hu,
        "parenchymal_difference_hu": difference(predicted.parenchymal_hu, reference.parenchymal_hu),
        "volumetric_difference_hu": difference(predicted.volumetric_hu, reference.volumetric_hu),
        "axial_difference_hu": difference(predicted.axial_hu, reference.axial_hu),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    cases = [case for case in CASES if case.ct.exists() and case.reference.exists()]
    if not cases:
        print(f"no reference cases found under {SHARED_DATA}", file=sys.stderr)
        return 1
    backend = load_backend(args.model, device=args.device)
    rows = []
    for case in cases:
        series = load_ct(case.ct)
        started = time.perf_counter()
        predicted = measure_series(series, backend, eligible=True, reasons=())
        seconds = time.perf_counter() - started
        reference_mask = read_mask(case.reference, series.volume, label=case.label)
        reference = measure_series(series, reference_mask, eligible=True, reasons=())
        rows.append({"case": case.name, "reference": case.reference_kind, "seconds": round(seconds, 1),
                     **compare(predicted, reference)})  # fmt: skip
    print(f"model: {backend.info.name} ({backend.info.version}, {backend.info.device})")
    header = ("case", "reference", "dice", "hd95_mm", "assd_mm", "volume_difference_pct", "parenchymal_difference_hu",
              "volumetric_difference_hu", "axial_difference_hu", "seconds")  # fmt: skip
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))
    print(SEED_FIGURES)
    if args.json:
        args.json.write_text(json.dumps({"model": backend.info.to_json(), "cases": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
