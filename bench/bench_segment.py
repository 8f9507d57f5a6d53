"""Benchmark: the default segmentation backend, time and peak memory per series, CPU and CUDA.

Each (case, device) runs in a fresh Python process, so its memory figures are its own:

- ``rss_before_mb``: resident memory with the series (source and working grid) and the model loaded;
- ``predict_peak_mb``: the process's peak resident memory during ``predict`` alone (the kernel's
  high-water mark is reset just before the call), i.e. what a node holding the series needs;
- ``process_peak_mb``: the peak of the whole child, reading and resampling included.

Reference, in the same process after ``predict``: one bare forward pass of the same network on a
single patch of the trained size (189 x 162 x 162 voxels at 3 mm, random input), timed after a
warm-up pass. Every series costs at least one such pass, so ``predict / forward`` shows what
cropping, resampling, tiling and post-processing add; a value near the number of tiles means the
network dominates. ``predict`` is the process's first call (a node's first series; later calls
measured within 10 % of it in time and within 0.1 GB in memory).

Precision (``--precision``, default ``auto``): every (case, device) runs twice, in fp32 and in the
chosen precision, each in its own process, alternating; the table prints both and the ratios
new/fp32 of ``predict`` and of the forward pass, the peak resident memory of each, and the Dice of
the new mask against the fp32 mask. Ratios from one run are comparable on a shared, noisy machine;
absolute seconds are not.

Cases (``--cases``): ``lidc`` (LIDC-IDRI-0002, a real unenhanced chest CT: two segmentation passes),
``phantom-300`` (the 300-slice 512 x 512 phantom series of ``bench/bench_node.py``), ``ircadb`` (3D-IRCADb-01 patient 1, 129 slices, enhanced abdomen),
``totalseg`` (TotalSegmentator's ``example_ct_sm``, 30 slices at 3 mm), ``ircadb-x600`` (that CT
resampled to 600 slices 0.625 mm apart, mirrored at its ends: 375 mm, the size of a thin-slice
chest CT and the memory target's case), ``ircadb-long`` (600 slices 1.6 mm apart: 960 mm, three
network tiles along z, the worst case), ``phantom`` (synthetic, needs no data). Real cases need
``../shared/data`` and are skipped without it.

Run from the repository root::

    .venv/bin/python bench/bench_segment.py [--cases lidc phantom-300 ircadb] [--devices cpu cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liverfat import __version__  # noqa: E402
from liverfat.dicom_io.masks import read_mask_file  # noqa: E402
from liverfat.dicom_io.nifti import read_nifti  # noqa: E402
from liverfat.dicom_io.read import discover, load_series, read_mask  # noqa: E402
from liverfat.dicom_io.resample import to_working_grid  # noqa: E402
from liverfat.inference.models.default import DefaultBackend  # noqa: E402
from liverfat.inference.models.devices import resolve_device  # noqa: E402
from liverfat.inference.models.precision import PRECISION_CHOICES, Precision  # noqa: E402
from liverfat.inference.models.unet import TRAINED_INPUT, LiverUNet, load_keras_weights  # noqa: E402
from liverfat.inference.models.weights import default_weights_path  # noqa: E402
from liverfat.volume import Volume  # noqa: E402
from tests.phantom import Grid, Phantom, render_volume  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LONG_SERIES_SLICES = 600
THIN_SLICE_MM = 0.625  # 600 slices: 375 mm, a thin-slice chest CT
LONG_SLICE_MM = 1.6  # 600 slices: 960 mm, more than two network tiles along z
TOTALSEGMENTATOR_LIVER_LABEL = 5
NODE_PHANTOM_SLICES = 300  # bench_node.py's series: 512 x 512, 360 mm field of view, 1 mm slices
NODE_PHANTOM_LIVER_HU = 32.0
CASES = ("lidc", "phantom-300", "ircadb", "totalseg", "ircadb-x600", "ircadb-long", "phantom")

Loaded = tuple[Volume, Volume, Volume | None]  # (source, working grid, reference mask or None)


def _ircadb(data: Path) -> Loaded:
    folder = data / "3dircadb-1.1"
    (series,) = discover([folder / "PATIENT_DICOM"]).series
    source = load_series(series).volume
    working = to_working_grid(source)
    return source, working, read_mask(folder / "MASKS_DICOM" / "liver", working)


def _ircadb_slices(data: Path, count: int, step_mm: float) -> Loaded:
    """3D-IRCADb's CT resampled (linearly, mirrored at its ends) to ``count`` slices ``step_mm`` apart."""
    (series,) = discover([data / "3dircadb-1.1" / "PATIENT_DICOM"]).series
    one = load_series(series).volume
    length = (one.array.shape[0] - 1) * one.spacing[2]
    position = np.arange(count) * step_mm % (2 * length)
    position = np.where(position > length, 2 * length - position, position) / one.spacing[2]
    stacked = np.empty((count, *one.array.shape[1:]), dtype=np.float32)
    for n, at in enumerate(position):
        low = min(int(at), one.array.shape[0] - 2)
        fraction = np.float32(at - low)
        np.multiply(one.array[low], 1 - fraction, out=stacked[n])
        stacked[n] += fraction * one.array[low + 1]
    spacing = (one.spacing[0], one.spacing[1], step_mm)
    source = Volume(stacked, spacing, one.origin, one.direction)
    return source, to_working_grid(source), None


def _ircadb_x600(data: Path) -> Loaded:
    return _ircadb_slices(data, LONG_SERIES_SLICES, THIN_SLICE_MM)


def _ircadb_long(data: Path) -> Loaded:
    return _ircadb_slices(data, LONG_SERIES_SLICES, LONG_SLICE_MM)


def _lidc(data: Path) -> Loaded:
    (series,) = discover([data / "chest-ct" / "lidc-idri-0002"]).series
    source = load_series(series).volume
    working = to_working_grid(source)
    return source, working, read_mask(data / "seed-dl-parenchymal" / "LIDC-IDRI_0002_3d_liver_seg.nii.gz", working)


def _phantom_300(_: Path) -> Loaded:
    positions = tuple((np.arange(NODE_PHANTOM_SLICES) - NODE_PHANTOM_SLICES / 2) * 1.0)
    grid = Grid(rows=512, columns=512, pixel_spacing_mm=360.0 / 512, slice_positions_mm=positions)
    source, truth = render_volume(Phantom().with_liver_hu(NODE_PHANTOM_LIVER_HU), grid)
    truth_on_working = to_working_grid(truth.with_array(truth.array.astype(np.float32)))
    return source, to_working_grid(source), truth_on_working.with_array(truth_on_working.array > 0.5)


def _totalseg(data: Path) -> Loaded:
    folder = data / "totalsegmentator-example"
    source = read_nifti(folder / "example_ct_sm.nii.gz").volume
    working = to_working_grid(source)
    return source, working, read_mask_file(folder / "example_seg.nii.gz", working, label=TOTALSEGMENTATOR_LIVER_LABEL)


def _phantom(_: Path) -> Loaded:
    phantom = replace(Phantom(), body=replace(Phantom().body, hu=-90.0))
    grid = Grid(rows=256, columns=256, pixel_spacing_mm=1.4, slice_positions_mm=tuple(np.arange(-150.0, 150.1, 1.25)))
    source, truth = render_volume(phantom, grid)
    working = to_working_grid(source)
    truth_on_working = to_working_grid(source.with_array(truth.array.astype(np.float32)))
    return source, working, working.with_array(truth_on_working.array > 0.5)


LOADERS: dict[str, Callable[[Path], Loaded]] = {
    "lidc": _lidc,
    "phantom-300": _phantom_300,
    "ircadb": _ircadb,
    "totalseg": _totalseg,
    "ircadb-x600": _ircadb_x600,
    "ircadb-long": _ircadb_long,
    "phantom": _phantom,
}
NEEDS_DATA = {"lidc", "ircadb", "totalseg", "ircadb-x600", "ircadb-long"}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    """Reset the kernel's resident high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _forward_seconds(device: torch.device, dtype: torch.dtype) -> float:
    """One timed forward pass of the same network on one trained-size patch (after a warm-up pass)."""
    network = LiverUNet()
    load_keras_weights(network, default_weights_path())
    network = network.to(device).to_precision(dtype).eval()
    patch = torch.rand(1, 1, *TRAINED_INPUT, device=device) - 0.5
    with torch.inference_mode():
        network(patch)  # oneDNN / cuDNN set-up, not timed
        _synchronise(device)
        started = time.perf_counter()
        network(patch)
        _synchronise(device)
    return time.perf_counter() - started


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: str, device_name: str, precision: str, data: Path, mask_file: Path) -> dict[str, Any]:
    """One case on one device in one precision, in this process; returns the figures, the mask in ``mask_file``."""
    source, working, reference = LOADERS[case](data)
    device = resolve_device(device_name)
    backend = DefaultBackend(device=device_name, precision=precision)
    rss_before = _status_mb("VmRSS")
    _reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    mask = backend.predict(working)
    _synchronise(device)
    predict_s, predict_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    predict_peak_mb = _status_mb("VmHWM")
    cuda_peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    np.save(mask_file, mask.array)
    dtype = torch.bfloat16 if backend.info.precision == Precision.BF16 else torch.float32
    forward_s = _forward_seconds(device, dtype)
    result: dict[str, Any] = {
        "case": case,
        "device": backend.info.device,
        "precision": backend.info.precision,
        "source_slices": int(source.array.shape[0]),
        "working_shape": list(working.array.shape),
        "predict_s": round(predict_s, 2),
        "predict_cpu_s": round(predict_cpu_s, 2),
        "forward_s": round(forward_s, 2),
        "predict_over_forward": round(predict_s / forward_s, 2),
        "rss_before_mb": round(rss_before),
        "predict_peak_mb": round(predict_peak_mb),
        "process_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
        "liver_ml": round(float(mask.array.sum()) * float(np.prod(working.spacing)) / 1000.0, 1),
    }
    if reference is not None:
        result["dice"] = round(_dice(mask.array, reference.array), 4)
    if cuda_peak_mb is not None:
        result["cuda_peak_mb"] = round(cuda_peak_mb)
    return result


def _child(case: str, device: str, precision: str, data: Path, mask_file: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", case, device, precision, str(mask_file), "--data", str(data)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        return {"case": case, "device": device, "precision": precision,
                "error": completed.stderr.strip().splitlines()[-1:]}  # fmt: skip
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def _pair(case: str, device: str, precision: str, data: Path) -> dict[str, Any]:
    """The case in fp32 and in ``precision``, one process each, and the ratios new/fp32."""
    with tempfile.TemporaryDirectory() as folder:
        masks = {p: Path(folder) / f"{p}.npy" for p in (Precision.FP32.value, "new")}
        reference = _child(case, device, Precision.FP32, data, masks[Precision.FP32])
        new = _child(case, device, precision, data, masks["new"])
        pair: dict[str, Any] = {"case": case, "device": device, "fp32": reference, "new": new}
        if "error" in reference or "error" in new:
            return pair
        pair["dice_new_vs_fp32"] = round(_dice(np.load(masks["new"]), np.load(masks[Precision.FP32])), 5)
    for figure in ("predict_s", "forward_s"):
        pair[f"{figure}_ratio"] = round(new[figure] / reference[figure], 2)
    return pair


def _print_table(pairs: Sequence[dict[str, Any]]) -> None:
    """Per case and device: each precision's figures, then the ratios new/fp32 and the masks' Dice."""
    print(f"{'case':<12} {'device':<24} {'precision':<9} {'predict s':>9} {'forward s':>9} {'peak MB':>8} "
          f"{'dice ref':>8}")  # fmt: skip
    for pair in pairs:
        for row in (pair["fp32"], pair["new"]):
            if "error" in row:
                print(f"{pair['case']:<12} {pair['device']:<24} {row['precision']:<9} error: {row['error']}")
                continue
            print(f"{pair['case']:<12} {row['device']:<24} {row['precision']:<9} {row['predict_s']:>9} "
                  f"{row['forward_s']:>9} {row['predict_peak_mb']:>8} {row.get('dice', ''):>8}")  # fmt: skip
        if "predict_s_ratio" in pair:
            print(f"{pair['case']:<12} {'':<24} {'new/fp32':<9} {pair['predict_s_ratio']:>9} "
                  f"{pair['forward_s_ratio']:>9} {'':>8} Dice new vs fp32 {pair['dice_new_vs_fp32']}")  # fmt: skip


def _manifest() -> dict[str, Any]:
    return {
        "liverfat": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped without a GPU")
    parser.add_argument("--data", type=Path, default=SHARED_DATA)
    parser.add_argument("--json", type=Path, help="also write the figures and the manifest here")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="compared with fp32 in the same run (default: auto)")  # fmt: skip
    parser.add_argument("--child", nargs=4, metavar=("CASE", "DEVICE", "PRECISION", "MASK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        case, device, precision, mask_file = args.child
        print(json.dumps(run_case(case, device, precision, args.data, Path(mask_file))))
        return 0

    manifest = _manifest()
    print(json.dumps(manifest))
    devices = [d for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    rows = []
    for case in args.cases:
        if case in NEEDS_DATA and not args.data.is_dir():
            print(f"{case}: skipped, {args.data} is absent")
            continue
        for device in devices:
            row = _pair(case, device, args.precision, args.data)
            rows.append(row)
            print(json.dumps(row), flush=True)
    _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"manifest": manifest, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
