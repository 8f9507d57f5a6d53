"""Benchmark of the write stage (SEG, circle SR, summary SR, key image): the fast path against a baseline.

The baseline is the write path of a git revision (``--baseline``, default ``611a497``: the write
path of 1956b86, whose 300-slice write stage took 4.7 s in the node, after refactors that did not
change what it does or how fast). Its ``dicom_io/seg.py``, ``keyimage.py`` and ``outputs.py`` are
read with ``git show`` and loaded beside the working tree's (the baseline modules import each
other; ``sr.py`` and everything else are the working tree's), and both write the same result of
the same series, in turn, ``--repeat`` times. Printed per object: the build time of the SEG, the
circle SR, the summary SR and the key image, each on its own; and the whole ``write_outputs``
(UIDs, the four objects, encoding, four durable writes), with the ratio new / baseline. Best of
the repeats (the machine is shared; the median is in the JSON). Then the files both paths wrote
are compared byte for byte: the fast path must write the same objects.

The node's first series after a start is written by a fresh worker process, which also pays for
what the libraries load on first use. So each path's first ``write_outputs`` is also timed in a
fresh process of its own (``first write, fresh process``), after loading and measuring the
series as the worker does, and on the new path after ``outputs.warm_up()``, which the worker now
calls at start (the baseline worker did not).

Cases: ``phantom`` (``--slices`` x 512 x 512 synthetic chest, its analytic liver as the mask),
``phantom-model`` (the same series with the liver the default model finds on it, three times
the analytic one and on nearly every slice: what the node writes in ``bench_node.py``) and
``lidc-idri-0002`` (the real chest CT in ``../shared/data``, 261 slices, with the seed
method's manual liver mask; skipped without the data). The result is measured by the pipeline
(``measure_series``) on that mask, so the ROIs are the method's own.

Run from the repository root::

    .venv/bin/python bench/bench_write.py [--cases phantom phantom-model lidc-idri-0002] [--slices 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import highdicom
import numpy as np
import pydicom

# Run as a script, Python puts bench/ on sys.path; the phantom helpers live in tests/ and bench_node.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baseline_cases import (  # noqa: E402
    add_arguments,
    lidc_missing,
    lidc_with_liver,
    phantom_with_liver,
    phantom_with_model_liver,
    print_rows,
    summarise,
    write_report,
)
from baseline_cases import load_baseline as load_modules  # noqa: E402

from liverfat import __version__  # noqa: E402
from liverfat.dicom_io import keyimage, outputs, seg  # noqa: E402
from liverfat.dicom_io.series import CTSeries  # noqa: E402
from liverfat.dicom_io.site import OutputSettings  # noqa: E402
from liverfat.dicom_io.sr import build_circle_sr, build_summary_sr  # noqa: E402
from liverfat.dicom_io.uids import output_uids  # noqa: E402
from liverfat.inference.pipeline import measure_series  # noqa: E402
from liverfat.result import AnalysisResult  # noqa: E402

DEFAULT_BASELINE = "611a497"
BASELINE_MODULES = ("seg", "keyimage", "outputs")  # in import order: each imports the ones before it
CREATED = datetime(2024, 5, 6, 7, 8, 9)  # both paths stamp the same times, so their files can be compared
SITE = OutputSettings()
OBJECTS = ("SEG", "circle SR", "summary SR", "key image")
CASES = ("phantom", "phantom-model", "lidc-idri-0002")


def load_baseline(revision: str) -> dict[str, ModuleType]:
    """The write modules of ``revision`` (``seg``, ``keyimage``, ``outputs``), beside the working tree's."""
    return load_modules(revision, [f"dicom_io.{name}" for name in BASELINE_MODULES])


def measured(series: CTSeries, liver: Any) -> tuple[CTSeries, AnalysisResult]:
    """``series`` and the pipeline's result of it with ``liver`` as the liver mask."""
    result = measure_series(series, liver, eligible=True, reasons=())
    if result.source_masks is None or not result.rois:
        raise RuntimeError(f"series {series.series_uid}: no ROIs placed, nothing to benchmark")
    return series, result


def object_builders(seg_module: ModuleType, keyimage_module: ModuleType,
                    series: CTSeries, result: AnalysisResult) -> dict[str, Callable[[], object]]:  # fmt: skip
    """One call per object, each built on its own (the summary SR on a SEG built beforehand)."""
    uids = output_uids(result, SITE.digest())
    built_seg = seg_module.build_seg(series, result, uids, SITE, CREATED)
    return {
        "SEG": lambda: seg_module.build_seg(series, result, uids, SITE, CREATED),
        "circle SR": lambda: build_circle_sr(series, result, uids, SITE, CREATED),
        "summary SR": lambda: build_summary_sr(series, result, built_seg, uids, SITE, CREATED),
        "key image": lambda: keyimage_module.build_key_image(series, result, uids, SITE, CREATED),
    }


def seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def load_case(name: str, phantom_dir: Path, slices: int) -> tuple[CTSeries, AnalysisResult]:
    if name == "phantom":
        return measured(*phantom_with_liver(phantom_dir, slices))
    if name == "phantom-model":
        return measured(*phantom_with_model_liver(phantom_dir, slices))
    return measured(*lidc_with_liver())


def first_write_seconds(path: str, name: str, phantom_dir: Path, args: argparse.Namespace) -> float:
    """``path``'s first ``write_outputs`` in a fresh process (this script, ``--first-write``)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--first-write", path, "--cases", name,
               "--slices", str(args.slices), "--phantom-dir", str(phantom_dir), "--baseline", args.baseline]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(completed.stdout.splitlines()[-1])["first_write_s"])


def first_write(path: str, name: str, phantom_dir: Path, slices: int, revision: str) -> float:
    """In this fresh process: load and measure the case, then time one ``write_outputs`` of ``path``."""
    write = load_baseline(revision)["outputs"].write_outputs if path == "baseline" else outputs.write_outputs
    series, result = load_case(name, phantom_dir, slices)
    if path == "new":
        outputs.warm_up()  # as the worker does at start
    with tempfile.TemporaryDirectory(prefix="liverfat-bench-write-first-") as tmp:
        return seconds(lambda: write(series, result, Path(tmp), created_at=CREATED))


def run_case(name: str, series: CTSeries, result: AnalysisResult, baseline: dict[str, ModuleType],
             repeat: int, work: Path) -> dict[str, Any]:  # fmt: skip
    paths = {
        "baseline": (baseline["seg"], baseline["keyimage"], baseline["outputs"]),
        "new": (seg, keyimage, outputs),
    }
    times: dict[str, dict[str, list[float]]] = {path: {key: [] for key in (*OBJECTS, "write")} for path in paths}
    for _ in range(repeat):  # interleaved, so drift in machine load hits both alike
        for path, (seg_module, keyimage_module, outputs_module) in paths.items():
            for key, build in object_builders(seg_module, keyimage_module, series, result).items():
                times[path][key].append(seconds(build))
            write = outputs_module.write_outputs
            out = work / name / path
            times[path]["write"].append(seconds(lambda: write(series, result, out, created_at=CREATED)))  # noqa: B023
    written = {path: sorted(p.name for p in (work / name / path).iterdir()) for path in paths}
    identical = written["baseline"] == written["new"] and all(
        (work / name / "baseline" / file).read_bytes() == (work / name / "new" / file).read_bytes()
        for file in written["new"]
    )
    return {
        "case": name,
        "slices": len(series.datasets),
        "matrix": list(series.volume.array.shape[1:]),
        "seg_frames": int(pydicom.dcmread(work / name / "new" / outputs.SEG_FILE, stop_before_pixels=True).NumberOfFrames),
        **summarise(times),
        "files": written["new"],
        "identical_files": identical,
    }


def print_case(figures: dict[str, Any], repeat: int) -> None:
    print(f"{figures['case']}: {figures['slices']} slices {figures['matrix'][0]}x{figures['matrix'][1]}, "
          f"SEG of {figures['seg_frames']} frames; best of {repeat}, seconds")  # fmt: skip
    labels = {key: f"build {key}" for key in OBJECTS} | {"write": "write_outputs (all four, encoded, fsynced)",
                                                          "first write": "  first write, fresh process"}  # fmt: skip
    print_rows(figures, labels, width=40)
    print(f"  files byte-identical ({', '.join(figures['files'])}): {'yes' if figures['identical_files'] else 'NO'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, repeat=5, baseline=DEFAULT_BASELINE, cases=CASES)
    parser.add_argument("--first-write", choices=["baseline", "new"], help=argparse.SUPPRESS)  # the bench's own child
    args = parser.parse_args(argv)
    if args.first_write is not None:
        seconds_taken = first_write(args.first_write, args.cases[0], args.phantom_dir, args.slices, args.baseline)
        print(json.dumps({"first_write_s": seconds_taken}))
        return 0

    baseline = load_baseline(args.baseline)
    cases = []
    with tempfile.TemporaryDirectory(prefix="liverfat-bench-write-") as tmp:
        work = Path(tmp)
        for name in args.cases:
            if lidc_missing(name):
                continue
            phantom_dir = args.phantom_dir or work / "phantom"
            series, result = load_case(name, phantom_dir, args.slices)
            figures = run_case(name, series, result, baseline, args.repeat, work)
            for path in ("baseline", "new"):
                figures["best_s"][path]["first write"] = round(first_write_seconds(path, name, phantom_dir, args), 3)
            first = figures["best_s"]["new"]["first write"] / figures["best_s"]["baseline"]["first write"]
            figures["ratio_new_to_baseline"]["first write"] = round(first, 2)
            print_case(figures, args.repeat)
            cases.append(figures)
    versions = {"liverfat": __version__, "highdicom": highdicom.__version__, "numpy": np.__version__}
    write_report("write", args, cases, versions)
    return 0 if all(case["identical_files"] for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
