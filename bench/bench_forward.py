"""Benchmark of the default network's forward pass: the working tree's ``unet.py`` against a baseline revision's.

Both networks get the same weights and the same input: the first network tile of the case's body box (what
``DefaultBackend`` feeds the network first: the crop averaged onto 3 mm, windowed, in the network's
layout, 189 x 162 x 162 voxels). They run in turn, ``--repeat`` times, in fp32 and in bf16 (bf16 only
where the CPU has it). Printed per precision: the best wall and CPU seconds of each, the ratios new /
baseline, the minor page faults of the best run, and whether the two outputs are identical to the last bit
(else their largest difference). Wall time on a shared machine swings by 2x; CPU time, summed over torch's
threads, swings less, and only runs in the same process compare.

Cases: ``phantom`` (the 300-slice phantom of ``bench_node.py``, ``--slices``) and ``lidc-idri-0002``
(needs ``../shared/data``).

Run from the repository root::

    .venv/bin/python bench/bench_forward.py [--cases phantom] [--baseline cd41a07] [--repeat 4] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

# Run as a script, Python puts bench/ on sys.path; the phantom helpers live in tests/ and bench_node.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baseline_cases import add_arguments, lidc_missing, lidc_with_liver, load_baseline, phantom_with_liver, write_report

from liverfat import __version__
from liverfat.dicom_io.resample import to_working_grid
from liverfat.dicom_io.series import CTSeries
from liverfat.inference.models import default, unet
from liverfat.inference.models.precision import native_bf16
from liverfat.inference.models.weights import DEFAULT_MODEL_CACHE, default_weights_path

DEFAULT_BASELINE = "cd41a07"  # before the normalisation's shared float32 buffer


def first_tile(series: CTSeries) -> torch.Tensor:
    """The network input ``DefaultBackend`` builds first for ``series``: ``(1, 1, 189, 162, 162)`` float32."""
    ct = to_working_grid(series.volume)
    spacing = (ct.spacing[2], ct.spacing[1], ct.spacing[0])
    box = default.body_box(ct.array, spacing)
    if box is None:
        raise RuntimeError("no body in the series")
    grid = default._CropGrid(box, spacing)
    image = np.ascontiguousarray(default._Orientation.of(ct).to_network(default.to_network_grid(ct.array[box], grid)))
    return torch.from_numpy(default.tiles(image.shape)[0].input_patch(image))[None, None]


def run_precision(patch: torch.Tensor, modules: dict[str, ModuleType], dtype: torch.dtype,
                  repeat: int) -> dict[str, Any]:  # fmt: skip
    weights = default_weights_path(DEFAULT_MODEL_CACHE)
    networks = {}
    for path, module in modules.items():
        network = module.LiverUNet()
        module.load_keras_weights(network, weights)
        networks[path] = network.to_precision(dtype).eval()
    runs: dict[str, list[tuple[float, float, int]]] = {path: [] for path in modules}
    outputs = {}
    for round_ in range(repeat):  # interleaved, the order swapped every round
        for path in list(modules)[:: 1 if round_ % 2 == 0 else -1]:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, wall = time.process_time(), time.perf_counter()
            with torch.inference_mode():
                outputs[path] = networks[path](patch.to(dtype))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            runs[path].append((wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
    best = {path: min(values) for path, values in runs.items()}
    identical = torch.equal(outputs["baseline"], outputs["new"])
    difference = (outputs["baseline"].float() - outputs["new"].float()).abs().max()
    return {
        "best_wall_s": {path: round(value[0], 3) for path, value in best.items()},
        "best_cpu_s": {path: round(min(v[1] for v in runs[path]), 3) for path in runs},
        "minor_faults_of_best": {path: value[2] for path, value in best.items()},
        "ratio_wall_new_to_baseline": round(best["new"][0] / best["baseline"][0], 3),
        "ratio_cpu_new_to_baseline": round(min(v[1] for v in runs["new"]) / min(v[1] for v in runs["baseline"]), 3),
        "identical_output": identical,
        "max_difference": float(difference),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, repeat=4, baseline=DEFAULT_BASELINE)
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    modules = {"baseline": load_baseline(args.baseline, ["inference.models.unet"])["unet"], "new": unet}
    precisions = [p for p in args.precisions if p == "fp32" or native_bf16(torch.device("cpu"))]
    cases = []
    with tempfile.TemporaryDirectory(prefix="liverfat-bench-forward-") as tmp:
        for name in args.cases:
            if lidc_missing(name):
                continue
            series, _ = phantom_with_liver(args.phantom_dir or Path(tmp) / "phantom", args.slices) \
                if name == "phantom" else lidc_with_liver()  # fmt: skip
            patch = first_tile(series)
            figures: dict[str, Any] = {"case": name, "input": list(patch.shape[2:])}
            for precision in precisions:
                dtype = torch.bfloat16 if precision == "bf16" else torch.float32
                figures[precision] = result = run_precision(patch, modules, dtype, args.repeat)
                same = "yes" if result["identical_output"] else f"no, largest difference {result['max_difference']:.3g}"
                print(f"{name} {precision}: best wall {result['best_wall_s']} s, cpu {result['best_cpu_s']} s, "
                      f"new/baseline wall {result['ratio_wall_new_to_baseline']}, cpu {result['ratio_cpu_new_to_baseline']}; "
                      f"minor faults {result['minor_faults_of_best']}; identical output: {same}")  # fmt: skip
            cases.append(figures)
    write_report("forward", args, cases, {"liverfat": __version__, "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
