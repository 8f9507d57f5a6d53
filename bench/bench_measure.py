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

Cases: ``phantom`` (``--slices`` x 512 x 512 synthetic chest, its analytic liver as the mask),
``phantom-model`` (the same series with the liver the default model finds on it, as in
``bench_node.py``: a much larger mask; not run unless named) and ``lidc-idri-0002`` (the real
chest CT in ``../shared/data`` with the seed method's liver mask; skipped without the data).

Run from the repository root::

    .venv/bin/python bench/bench_measure.py [--cases phantom phantom-model lidc-idri-0002] [--slices 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
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

from baseline_cases import (
    add_arguments,
    lidc_missing,
    lidc_with_liver,
    phantom_with_liver,
    phantom_with_model_liver,
    print_rows,
    summarise,
    write_report,
)
from baseline_cases import load_baseline as load_modules

from liverfat import __version__
from liverfat.dicom_io.series import CTSeries
from liverfat.inference import image_checks, pipeline
from liverfat.result import AnalysisResult
from liverfat.volume import Volume

DEFAULT_BASELINE = "cf8ebb5"
# In import order: each imports the ones before it.
BASELINE_MODULES = ("dicom_io.resample", "inference.roi", "inference.attenuation", "inference.grading",
                    "inference.image_checks", "inference.pipeline")  # fmt: skip
STAGES = ("not_ct_finding", "region_finding", "resample", "segment", "rois", "measure", "grade", "masks")
AFTER_SEGMENT = ("rois", "measure", "grade", "masks")
CASES = ("phantom", "phantom-model", "lidc-idri-0002")


def load_baseline(revision: str) -> dict[str, ModuleType]:
    """The modules ``BASELINE_MODULES`` of ``revision``, beside the working tree's."""
    return load_modules(revision, BASELINE_MODULES)


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
    return {
        "case": name,
        "slices": len(series.datasets),
        **summarise(times),
        "identical_results": same_result(outcomes["baseline"], outcomes["new"]),
    }


def load_case(name: str, phantom_dir: Path, slices: int) -> tuple[CTSeries, Volume]:
    if name == "phantom":
        return phantom_with_liver(phantom_dir, slices)
    if name == "phantom-model":
        return phantom_with_model_liver(phantom_dir, slices)
    return lidc_with_liver()


def print_case(figures: dict[str, Any], repeat: int) -> None:
    print(f"{figures['case']}: {figures['slices']} slices; best of {repeat}, seconds")
    labels = {"not_ct_finding": "image check: is it a CT", "region_finding": "image check: chest region (no header)",
              "resample": "resample to the working grid", "segment": "user mask onto the working grid",
              "rois": "place ROIs", "measure": "measure (reference, ROI checks, attenuation)", "grade": "grade",
              "masks": "masks back to the source grid",
              "after segment": "rois + measure + grade + masks"}  # fmt: skip
    print_rows(figures, labels, width=46)
    print(f"  identical results (result.json, findings, masks): {'yes' if figures['identical_results'] else 'NO'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, repeat=3, baseline=DEFAULT_BASELINE, cases=CASES)
    args = parser.parse_args(argv)

    baseline = load_baseline(args.baseline)
    cases = []
    with tempfile.TemporaryDirectory(prefix="liverfat-bench-measure-") as tmp:
        for name in args.cases:
            if lidc_missing(name):
                continue
            series, liver = load_case(name, args.phantom_dir or Path(tmp) / "phantom", args.slices)
            figures = run_case(name, series, liver, baseline, args.repeat)
            print_case(figures, args.repeat)
            cases.append(figures)
    write_report("measure", args, cases, {"liverfat": __version__, "numpy": np.__version__})
    return 0 if all(case["identical_results"] for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
