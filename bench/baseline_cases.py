"""What the side-by-side benchmarks (``bench_write.py``, ``bench_measure.py``) share: a baseline
revision's modules loaded from git beside the working tree's, and the two series they run on
(the 300-slice phantom with its analytic liver, LIDC-IDRI-0002 with the seed's liver mask).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

# Run as a script, Python puts bench/ on sys.path; the phantom helpers live in tests/ and bench_node.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_node import write_phantom  # noqa: E402

from liverfat.dicom_io.read import discover, load_series, read_mask  # noqa: E402
from liverfat.dicom_io.resample import to_working_grid  # noqa: E402
from liverfat.dicom_io.series import CTSeries  # noqa: E402
from liverfat.inference.models.registry import load_backend  # noqa: E402
from liverfat.volume import Volume  # noqa: E402
from tests.dicom_io.output_cases import ds_points  # noqa: E402
from tests.phantom import Phantom  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
LIDC = SHARED / "chest-ct" / "lidc-idri-0002"
LIDC_LIVER = SHARED / "seed-dl-parenchymal" / "LIDC-IDRI_0002_3d_liver_seg.nii.gz"


def load_baseline(revision: str, modules: Sequence[str]) -> dict[str, ModuleType]:
    """``modules`` (paths like ``dicom_io.seg``, in import order) as they are at ``revision``.

    While one is executed, ``sys.modules`` maps the names of those loaded before it to their
    baseline modules, so its ``from liverfat.dicom_io.seg import ...`` gets the baseline's; the
    working tree's modules are put back afterwards. Keyed by the module's last name (``seg``).
    """
    names = [f"liverfat.{short}" for short in modules]
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    loaded: dict[str, ModuleType] = {}
    try:
        for short, name in zip(modules, names, strict=True):
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


def load(folder: Path) -> CTSeries:
    (found,) = discover([folder]).series
    return load_series(found)


def phantom_with_liver(folder: Path, slices: int) -> tuple[CTSeries, Volume]:
    """The phantom in ``folder`` (written there first unless it is already), with its analytic liver."""
    if not folder.is_dir() or not any(folder.iterdir()):
        write_phantom(folder, slices)
    series = load(folder)
    if len(series.datasets) != slices:
        raise RuntimeError(f"{folder} holds a phantom of {len(series.datasets)} slices, not {slices}")
    phantom = Phantom()
    liver = np.stack([phantom.liver_at(ds_points(dataset)) for dataset in series.datasets])
    return series, series.volume.with_array(liver)


def phantom_with_model_liver(folder: Path, slices: int) -> tuple[CTSeries, Volume]:
    """The phantom in ``folder`` with the liver the default model finds on it (on the working grid).

    The network segments the synthetic chest poorly (Dice 0.43 against the analytic liver): a
    mask of 4.3 M working voxels, three times the analytic one, which is what the node measures.
    """
    series, _ = phantom_with_liver(folder, slices)
    return series, load_backend("default").predict(to_working_grid(series.volume))


def lidc_with_liver() -> tuple[CTSeries, Volume]:
    series = load(LIDC)
    return series, read_mask(LIDC_LIVER, series.volume)


def add_arguments(parser: argparse.ArgumentParser, *, repeat: int, baseline: str,
                  cases: Sequence[str] = ("phantom", "lidc-idri-0002")) -> None:  # fmt: skip
    """The options both benchmarks take: cases (``cases``), phantom size and folder, rounds, baseline, JSON output."""
    parser.add_argument("--cases", nargs="+", default=["phantom", "lidc-idri-0002"], choices=list(cases))
    parser.add_argument("--slices", type=int, default=300, help="slices of the phantom")
    parser.add_argument("--repeat", type=int, default=repeat, help="interleaved rounds, best kept")
    parser.add_argument("--baseline", default=baseline, help="git revision whose modules are the baseline")
    parser.add_argument("--phantom-dir", type=Path, help="keep the phantom here and reuse it (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the figures and versions here")


def lidc_missing(name: str) -> bool:
    """Whether ``name`` is the LIDC case and its data is not beside the checkout (said on stdout)."""
    if name == "lidc-idri-0002" and not (LIDC.is_dir() and LIDC_LIVER.is_file()):
        print(f"{name}: skipped, {LIDC} or {LIDC_LIVER} is missing")
        return True
    return False


def summarise(times: Mapping[str, Mapping[str, list[float]]]) -> dict[str, Any]:
    """Best and median seconds of each path ("baseline", "new") and key, and new / baseline of the best."""
    best = {path: {key: min(values) for key, values in by_key.items()} for path, by_key in times.items()}
    return {
        "best_s": {path: {key: round(value, 3) for key, value in by_key.items()} for path, by_key in best.items()},
        "median_s": {
            path: {key: round(statistics.median(values), 3) for key, values in by_key.items()}
            for path, by_key in times.items()
        },
        "ratio_new_to_baseline": {key: round(best["new"][key] / best["baseline"][key], 2) for key in best["new"]},
    }


def print_rows(figures: Mapping[str, Any], labels: Mapping[str, str], width: int) -> None:
    """One line per key of ``labels``: the best baseline and new seconds and their ratio."""
    best, ratio = figures["best_s"], figures["ratio_new_to_baseline"]
    print(f"  {'':<{width}} {'baseline':>9} {'new':>9} {'new/base':>9}")
    for key, label in labels.items():
        print(f"  {label:<{width}} {best['baseline'][key]:9.3f} {best['new'][key]:9.3f} {ratio[key]:9.2f}")


def write_report(benchmark: str, args: argparse.Namespace, cases: list[dict[str, Any]],
                 versions: Mapping[str, str]) -> None:  # fmt: skip
    """The run's figures as one JSON line on stdout, and in ``--json`` when given."""
    report = {
        "benchmark": benchmark,
        "baseline": args.baseline,
        "cases": cases,
        "versions": {**versions, "python": platform.python_version()},
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine slows both paths
    }
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
