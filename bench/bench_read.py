"""Benchmark: ``discover`` + ``load_series`` against plain pydicom on one uncompressed CT series.

The reference is what any reader has to do at least: ``pydicom.dcmread`` of every file and
``np.stack`` of the ``pixel_array``s. liverfat additionally reads headers first, sorts by
position, checks the geometry and converts to float32 HU, so the ratio shows that overhead.

Run from the repository root::

    .venv/bin/python bench/bench_read.py [--slices 200] [--size 512] [--repeat 3] [--json result.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom

# Run as a script, Python puts bench/ on sys.path; the phantom writer lives in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liverfat import __version__  # noqa: E402
from liverfat.dicom_io.read import discover, load_series  # noqa: E402
from tests.phantom import Grid, Phantom, SeriesHeader, write_series  # noqa: E402

SLICE_STEP_MM = 1.25
CHUNK_SLICES = 20  # slices rendered at once, to bound the phantom's memory


class ReadBenchmark:
    """asv-style: ``setup`` writes the series, ``time_*`` read it."""

    def __init__(self, folder: Path, slices: int, size: int) -> None:
        self.folder, self.slices, self.size = folder, slices, size

    def setup(self) -> None:
        positions = (np.arange(self.slices) - self.slices / 2) * SLICE_STEP_MM
        header = SeriesHeader(slice_thickness_mm=SLICE_STEP_MM)
        for start in range(0, self.slices, CHUNK_SLICES):
            grid = Grid(
                rows=self.size,
                columns=self.size,
                pixel_spacing_mm=360.0 / self.size,
                slice_positions_mm=tuple(positions[start : start + CHUNK_SLICES]),
            )
            write_series(self.folder / f"part_{start:04d}", Phantom(), grid, header)

    def time_liverfat(self) -> None:
        (series,) = discover([self.folder]).series
        load_series(series)

    def time_reference(self) -> None:
        paths = sorted(path for path in self.folder.rglob("*") if path.is_file())
        np.stack([pydicom.dcmread(path).pixel_array for path in paths])


def seconds(function: Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (after one warm-up run)")
    parser.add_argument("--json", type=Path, help="also write the figures and versions here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="liverfat-bench-") as tmp:
        bench = ReadBenchmark(Path(tmp), args.slices, args.size)
        bench.setup()
        bench.time_reference()  # warm the page cache so both read from memory
        times: dict[str, list[float]] = {"liverfat": [], "reference": []}
        for _ in range(args.repeat):  # interleaved, so drift in machine load hits both alike
            times["liverfat"].append(seconds(bench.time_liverfat))
            times["reference"].append(seconds(bench.time_reference))

    best = {name: min(values) for name, values in times.items()}
    result = {
        "benchmark": "read",
        "series": f"{args.slices} slices {args.size}x{args.size} int16, explicit VR little endian",
        "best_s": {name: round(value, 3) for name, value in best.items()},
        "median_s": {name: round(statistics.median(values), 3) for name, values in times.items()},
        "ratio_best": round(best["liverfat"] / best["reference"], 2),
        "versions": {
            "liverfat": __version__,
            "pydicom": pydicom.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": platform.platform(),
    }
    print(f"liverfat discover+load_series: {best['liverfat']:.3f} s (best of {args.repeat})")
    print(f"pydicom dcmread+np.stack:      {best['reference']:.3f} s (best of {args.repeat})")
    print(f"ratio liverfat/reference:      {result['ratio_best']:.2f}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
