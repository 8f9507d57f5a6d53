"""Benchmark of the stages around segmentation: the working tree's against a baseline revision's.

Timed per path, on the same series with the same liver mask (so no model runs): the image checks
(``not_ct_finding``, and ``region_finding``, which the node runs when no header names the body part)
and ``measure_series``' own stages: resample, the user mask onto the working grid (``segment``),
ROI placement (``rois``), ``measure`` (parenchymal reference, ROI checks and replacements,
attenuation), ``grade`` and the masks back to the source grid (``masks``).

The baseline is a git revision (``--baseline``, default ``cf8ebb5``: the code before the fast
paths of the measure and masks stages). Its ``dicom_io/resample.py`` and ``inference/roi.py``,
``attenuation.py``, ``grading.py``, ``image_checks.py`` and ``pipeline.py`` are read with
``git show`` and loaded beside the working tree's, each importing the others' baseline versions
(everything else is the working tree's). Both paths run in turn, ``--repeat`` times; printed is
the best time per stage (the machine is shared; medians are in the JSON), the ratio new /
baseline, and whether both paths gave the same result: ``result.json``'s content but the
timings, the image checks' findings, and the liver and ROI masks on both grids, value for value.

Cases: ``phantom`` (``--slices`` x 512 x 512 synthetic chest, its analytic liver as the mask) and
``lidc-idri-0002`` (the real chest CT in ``../shared/data`` with the seed method's liver mask;
skipped without the data).

Run from the repository root::

    .venv/bin/python bench/bench_measure.py [--cases phantom lidc-idri-0002] [--slices 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

# Run as a script, Python puts bench/ on sys.path; the phantom helpers live in tests/ and bench_node.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_node import write_phantom
from bench_write import LIDC, LIDC_LIVER, load

from liverfat import __version__
from liverfat.dicom_io.read import read_mask
from liverfat.dicom_io.series import CTSeries
from liverfat.inference import image_checks, pipeline
from liverfat.result import AnalysisResult
from liverfat.volume import Volume
from tests.dicom_io.output_cases import ds_points
from tests.phantom import Phantom

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "cf8ebb5"
# In import order: each imports the ones before it.
BASELINE_MODULES = ("dicom_io.resample", "inference.roi", "inference.attenuation", "inference.grading",
                    "inference.image_checks", "inference.pipeline")  # fmt: skip
STAGES = ("not_ct_finding", "region_finding", "resample", "segment", "rois", "measure", "grade", "masks")
AFTER_SEGMENT = ("rois", "measure", "grade", "masks")


def load_baseline(revision: str) -> dict[str, ModuleType]:
    """The modules ``BASELINE_MODULES`` of ``revision``, each importing the others' baseline versions.

    While one is executed, ``sys.modules`` maps the names of those loaded before it to their
    baseline modules; the working tree's modules are put back afterwards.
    """
    names = [f"liverfat.{short}" for short in BASELINE_MODULES]
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    loaded: dict[str, ModuleType] = {}
    try:
        for short, name in zip(BASELINE_MODULES, names, strict=True):
            path = f"{short.replace('.', '/')}.py"
            source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO, check=True,
                                    capture_output=True, text=True).stdout  # fmt: skip
            module = ModuleType(name)
            module.__file__ = f"{revision}:{path}"
            sys.modules[name] = module
            exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102  # our own code, from git
            loaded[short.split(".")[-1]] = module
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return loaded


def phantom_case(folder: Path, slices: int) -> tuple[CTSeries, Volume]:
    """The phantom in ``folder`` (written there first unless it is already), with its analytic liver."""
    if not folder.is_dir() or not any(folder.iterdir()):
        write_phantom(folder, slices)
    series = load(folder)
    if len(series.datasets) != slices:
        raise RuntimeError(f"{folder} holds a phantom of {len(series.datasets)} slices, not {slices}")
    phantom = Phantom()
    liver = np.stack([phantom.liver_at(ds_points(dataset)) for dataset in series.datasets])
    return series, series.volume.with_array(liver)


def lidc_case() -> tuple[CTSeries, Volume]:
    series = load(LIDC)
    return series, read_mask(LIDC_LIVER, series.volume)


def run_path(checks: ModuleType, stages: ModuleType, series: CTSeries, liver: Volume
             ) -> tuple[dict[str, float], AnalysisResult, list[Any]]:  # fmt: skip
    """One pass of ``path``'s image checks and ``measure_series``: stage times, result, findings."""
    times: dict[str, float] = {}
    findings = []
    for name in ("not_ct_finding", "region_finding"):
        check: Callable[[Volume], Any] = getattr(checks, name)
        started = time.perf_counter()
        findings.append(check(series.volume))
        times[name] = time.perf_counter() - started
    result = stages.measure_series(series, liver, eligible=True, reasons=())
    times.update(result.timings_s)
    return times, result, findings


def same_result(a: tuple[AnalysisResult, list[Any]], b: tuple[AnalysisResult, list[Any]]) -> bool:
    """Same result.json (timings aside), same findings, same masks on both grids, value for value."""
    (first, first_findings), (second, second_findings) = a, b
    documents = [{key: value for key, value in r.to_json().items() if key != "timings_s"} for r in (first, second)]
    masks = []
    for result in (first, second):
        assert result.working_masks is not None and result.source_masks is not None
        masks.append([m.array for m in (result.working_masks.liver, result.working_masks.rois,
                                        result.source_masks.liver, result.source_masks.rois)])  # fmt: skip
    return (
        json.dumps(documents[0], sort_keys=True) == json.dumps(documents[1], sort_keys=True)
        and first_findings == second_findings
        and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(*masks, strict=True))
    )


def run_case(name: str, series: CTSeries, liver: Volume, baseline: dict[str, ModuleType],
             repeat: int) -> dict[str, Any]:  # fmt: skip
    paths = {"baseline": (baseline["image_checks"], baseline["pipeline"]), "new": (image_checks, pipeline)}
    times: dict[str, dict[str, list[float]]] = {path: {stage: [] for stage in STAGES} for path in paths}
    outcomes = {}
    for _ in range(repeat):  # interleaved, so drift in machine load hits both alike
        for path, (checks, stages) in paths.items():
            taken, result, findings = run_path(checks, stages, series, liver)
            for stage in STAGES:
                times[path][stage].append(taken[stage])
            times[path].setdefault("after segment", []).append(sum(taken[stage] for stage in AFTER_SEGMENT))
            outcomes[path] = (result, findings)
    best = {path: {key: min(values) for key, values in by_key.items()} for path, by_key in times.items()}
    return {
        "case": name,
        "slices": len(series.datasets),
        "best_s": {path: {key: round(value, 3) for key, value in by_key.items()} for path, by_key in best.items()},
        "median_s": {
            path: {key: round(statistics.median(values), 3) for key, values in by_key.items()}
            for path, by_key in times.items()
        },
        "ratio_new_to_baseline": {key: round(best["new"][key] / best["baseline"][key], 2) for key in best["new"]},
        "identical_results": same_result(outcomes["baseline"], outcomes["new"]),
    }


def print_case(figures: dict[str, Any], repeat: int) -> None:
    best, ratio = figures["best_s"], figures["ratio_new_to_baseline"]
    print(f"{figures['case']}: {figures['slices']} slices; best of {repeat}, seconds")
    print(f"  {'':<46} {'baseline':>9} {'new':>9} {'new/base':>9}")
    labels = {"not_ct_finding": "image check: is it a CT", "region_finding": "image check: chest region (no header)",
              "resample": "resample to the working grid", "segment": "user mask onto the working grid",
              "rois": "place ROIs", "measure": "measure (reference, ROI checks, attenuation)", "grade": "grade",
              "masks": "masks back to the source grid",
              "after segment": "rois + measure + grade + masks"}  # fmt: skip
    for key, label in labels.items():
        print(f"  {label:<46} {best['baseline'][key]:9.3f} {best['new'][key]:9.3f} {ratio[key]:9.2f}")
    print(f"  identical results (result.json, findings, masks): {'yes' if figures['identical_results'] else 'NO'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["phantom", "lidc-idri-0002"],
                        choices=["phantom", "lidc-idri-0002"])  # fmt: skip
    parser.add_argument("--slices", type=int, default=300, help="slices of the phantom")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the baseline stages")
    parser.add_argument("--phantom-dir", type=Path, help="keep the phantom here and reuse it (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the figures and versions here")
    args = parser.parse_args(argv)

    baseline = load_baseline(args.baseline)
    cases = []
    with tempfile.TemporaryDirectory(prefix="liverfat-bench-measure-") as tmp:
        for name in args.cases:
            if name == "lidc-idri-0002" and not (LIDC.is_dir() and LIDC_LIVER.is_file()):
                print(f"{name}: skipped, {LIDC} or {LIDC_LIVER} is missing")
                continue
            series, liver = phantom_case(args.phantom_dir or Path(tmp) / "phantom", args.slices) \
                if name == "phantom" else lidc_case()  # fmt: skip
            figures = run_case(name, series, liver, baseline, args.repeat)
            print_case(figures, args.repeat)
            cases.append(figures)
    report = {
        "benchmark": "measure",
        "baseline": args.baseline,
        "cases": cases,
        "versions": {"liverfat": __version__, "numpy": np.__version__, "python": platform.python_version()},
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine slows both paths
    }
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(case["identical_results"] for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
