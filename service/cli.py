"""The ``liverfat`` command line: argument parsing only; every command calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from liverfat import __version__
from liverfat.analysis import AnalysisOptions, Outcome, SeriesReport
from liverfat.dicom_io.read import discover
from liverfat.errors import LiverfatError
from liverfat.inference.backend import Backend
from liverfat.inference.models.devices import DEVICE_CHOICES, device_problem
from liverfat.inference.roi import RoiMode
from liverfat.service.config import load_config
from liverfat.service.models_cli import add_models_commands
from liverfat.service.node_cli import add_node_commands
from liverfat.service.research import analyze_inputs, check_inputs

log = logging.getLogger("liverfat")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        return int(args.command(args))
    except LiverfatError as error:
        print(f"liverfat: {error.message} [{error.reason.value}]", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liverfat",
        description="Liver attenuation and moderate-to-severe steatosis grade on unenhanced chest CT, "
        "as a DICOM node (serve) or on files (check, analyze). For research / decision support.",
    )
    parser.add_argument("--version", action="version", version=f"liverfat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="header-only eligibility, one JSON object per series per line")
    check.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files or folders (recursive)")
    check.set_defaults(command=cmd_check)

    analyze = commands.add_parser("analyze", help="measure liver attenuation and grade steatosis")
    analyze.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files/folders or NIfTI files")
    analyze.add_argument("--out", type=Path, required=True, help="output folder")
    analyze.add_argument("--mask", type=Path, help="your own liver mask (NIfTI or DICOM SEG) instead of a model")
    analyze.add_argument("--model", help="'default', an nnU-Net v2 model folder, or a model name "
                         "(default: [model] name)")  # fmt: skip
    analyze.add_argument("--device", type=device_arg, help=f"{', '.join(DEVICE_CHOICES)} or cuda:N "
                         "(default: [model] device)")  # fmt: skip
    analyze.add_argument("--force", action="store_true", help="process header-ineligible series anyway")
    analyze.add_argument("--save-mask", action="store_true", help="write liver_mask.nii.gz on the source grid")
    analyze.add_argument("--no-dicom", action="store_true", help="write no SEG/SR/key image")
    analyze.add_argument("--roi-mode", choices=[m.value for m in RoiMode], help="default: [analysis] roi_mode")
    analyze.add_argument("--threshold-hu", type=float, help="DL-parenchymal below this (strictly) is "
                         "moderate-to-severe steatosis (default: [grading] threshold_hu)")  # fmt: skip
    analyze.set_defaults(command=cmd_analyze)

    add_models_commands(commands)
    add_node_commands(commands)
    return parser


def device_arg(value: str) -> str:
    """``--device``: a device name that ``liverfat.inference.models.devices`` accepts."""
    problem = device_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def cmd_check(args: argparse.Namespace) -> int:
    for decision in check_inputs(args.inputs, load_config().eligibility):
        print(json.dumps(decision), flush=True)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """The node's configuration (embedded defaults and ``LIVERFAT_*``), with the options given here on top."""
    node = load_config()
    analysis = node.analysis
    if args.roi_mode is not None:
        analysis = replace(analysis, roi_mode=RoiMode(args.roi_mode))
    if args.threshold_hu is not None:
        analysis = replace(analysis, grading=replace(analysis.grading, threshold_hu=args.threshold_hu))
    options = AnalysisOptions(out_dir=args.out, mask=args.mask, force=args.force, save_mask=args.save_mask,
                             write_dicom=not args.no_dicom, policy=node.eligibility, config=analysis)  # fmt: skip

    def load_model() -> Backend:
        from liverfat.inference.models.registry import load_backend

        return load_backend(args.model or node.model.name, device=args.device or node.model.device,
                            cache_dir=node.model.cache)  # fmt: skip

    progress = _progress_bar()
    reports = analyze_inputs(args.inputs, options, load_model, on_series_done=progress)
    for report in reports:
        print(_summary_line(report))
    failed = [r for r in reports if r.outcome is Outcome.FAILED]
    if not reports:
        print("liverfat: no CT series found in the inputs" + _skipped_reasons(args.inputs), file=sys.stderr)
        return 1
    if failed:
        print(f"liverfat: {len(failed)} of {len(reports)} series failed; see result.json in {args.out}", file=sys.stderr)
        return 1
    return 0


def _skipped_reasons(inputs: Sequence[Path], limit: int = 5) -> str:
    """Why the input files were skipped (a DICOM SEG, a non-DICOM file, ...), one line each."""
    skipped = discover(inputs).skipped  # headers only, and only on this failure path
    lines = [f"\n  {s.finding.message} [{s.finding.code.value}]" for s in skipped[:limit]]
    more = [f"\n  ... and {len(skipped) - limit} more"] if len(skipped) > limit else []
    return "".join(lines + more)


def _summary_line(report: SeriesReport) -> str:
    result = report.result
    value = f" {result.value_text()}" if result.value_text() else ""
    why = "; ".join(f.message for f in result.reasons) if report.outcome is not Outcome.PROCESSED else ""
    return f"{result.series_uid}: {report.outcome.value}, {result.grade.value}{value}" + (f" ({why})" if why else "")


def _progress_bar() -> Callable[[SeriesReport], None] | None:
    """A tqdm bar advanced once per series, on a terminal only."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(unit="series", desc="analyze")
    return lambda _report: bar.update(1)


if __name__ == "__main__":
    sys.exit(main())
