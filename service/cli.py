"""The ``liverfat`` command line: argument parsing only; every command calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from liverfat import __version__
from liverfat.analysis import AnalysisOptions, BackendLoader, ModelCache, Outcome
from liverfat.dicom_io.series import SkippedFile
from liverfat.errors import LiverfatError, Reason
from liverfat.inference.backend import Backend
from liverfat.inference.models.devices import DEVICE_CHOICES, device_problem
from liverfat.inference.roi import RoiMode
from liverfat.service.config import QueueSection, load_config
from liverfat.service.config_cli import add_config_commands
from liverfat.service.fleet.urls import redacted
from liverfat.service.fleet.worker_cli import add_worker_command
from liverfat.service.heap import keep_freed_memory
from liverfat.service.models_cli import add_models_commands
from liverfat.service.node_cli import add_node_commands
from liverfat.service.progress import ConsoleProgress
from liverfat.service.research import (
    RESULTS_CSV,
    SKIPPED_JSON,
    ResearchRun,
    RunResult,
    analyze_inputs,
    check_inputs,
    plan_run,
)

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

    check = commands.add_parser("check", help="header-only eligibility, one JSON object per series per line "
                                "(exit 1 when an input is missing or holds no CT)")  # fmt: skip
    check.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files or folders (recursive)")
    check.set_defaults(command=cmd_check)

    analyze = commands.add_parser(
        "analyze", help="measure liver attenuation and grade steatosis",
        description="Writes <out>/results.csv (one row per case, kept and extended by later runs into the same "
        "--out), <out>/<case>/result.json, preview.png and DICOM SEG/SR/key image. A re-run skips cases whose "
        "result is current (same input files, software version and settings) unless --force. Exit status: 0 "
        "when every case was processed or cleanly rejected, 1 when a case failed, a mask was rejected, an input "
        "is missing or no CT was found, 2 on a configuration error.",
    )  # fmt: skip
    analyze.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files/folders or NIfTI files")
    analyze.add_argument("--out", type=Path, required=True, help="output folder")
    analyze.add_argument("--mask", type=Path, help="your own liver mask (NIfTI, DICOM SEG, or a folder holding a "
                         "DICOM mask series) instead of a model")  # fmt: skip
    analyze.add_argument("--mask-label", type=positive_int, metavar="N", help="the liver's label in a multi-label "
                         "--mask: a NIfTI label value or a SEG segment number")  # fmt: skip
    analyze.add_argument("--model", help="'default', an nnU-Net v2 model folder, or a model name "
                         "(default: [model] name)")  # fmt: skip
    analyze.add_argument("--device", type=device_arg, help=f"{', '.join(DEVICE_CHOICES)} or cuda:N "
                         "(default: [model] device)")  # fmt: skip
    analyze.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="the default model's arithmetic "
                         "(default: [model] precision)")  # fmt: skip
    analyze.add_argument("--force", action="store_true", help="analyse every case again, even those whose "
                         "result in --out is current")  # fmt: skip
    analyze.add_argument("--ignore-eligibility", action="store_true", help="measure header-ineligible series "
                         "anyway (reported with their reasons, never graded)")  # fmt: skip
    analyze.add_argument("--save-mask", action="store_true", help="write liver_mask.nii.gz on the source grid")
    analyze.add_argument("--save-ct", action="store_true", help="write the DICOM series as ct.nii.gz (dicom2nifti; "
                         "a NIfTI input is its own CT file)")  # fmt: skip
    analyze.add_argument("--no-identifiers", action="store_true", help="leave PatientID, AccessionNumber and "
                         "StudyDate out of results.csv")  # fmt: skip
    analyze.add_argument("--no-dicom", action="store_true", help="write no SEG/SR/key image")
    analyze.add_argument("--roi-mode", choices=[m.value for m in RoiMode], help="default: [analysis] roi_mode")
    analyze.add_argument("--threshold-hu", type=float, help="DL-parenchymal below this (strictly) is "
                         "moderate-to-severe steatosis (default: [grading] threshold_hu)")  # fmt: skip
    analyze.add_argument("--broker", nargs="?", const="", metavar="URL", help="have the fleet's workers ('liverfat "
                         "worker') analyse the DICOM series: publish each to this RabbitMQ (amqp:// or amqps://; "
                         "without URL: [queue] broker, i.e. LIVERFAT_QUEUE_BROKER, which keeps the password off the "
                         "command line) and add their rows to results.csv as they finish. --out and the inputs must "
                         "be on storage the workers share ([queue] path_map on theirs); the workers' own [model] "
                         "is used. NIfTI files are analysed here, on this machine's model")  # fmt: skip
    analyze.set_defaults(command=cmd_analyze)

    add_models_commands(commands)
    add_node_commands(commands)
    add_config_commands(commands)
    add_worker_command(commands)
    return parser


def device_arg(value: str) -> str:
    """``--device``: a device name that ``liverfat.inference.models.devices`` accepts."""
    problem = device_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def positive_int(value: str) -> int:
    """``--mask-label``: a label value or segment number, 1 or more."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more (0 is background), got {number}")
    return number


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 1 when an input path is missing or no CT (DICOM series or NIfTI) was found at all."""
    found_ct = False
    missing = False
    for decision in check_inputs(args.inputs, load_config().eligibility):
        print(json.dumps(decision), flush=True)
        found_ct = found_ct or decision["series_uid"] is not None or decision["eligible"] is None  # a series, a NIfTI
        missing = missing or any(reason["code"] == Reason.NOT_FOUND.value for reason in decision["reasons"])
    return 1 if missing or not found_ct else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """The node's configuration (embedded defaults and ``LIVERFAT_*``), with the options given here on top."""
    node = load_config()
    analysis = node.analysis
    if args.roi_mode is not None:
        analysis = replace(analysis, roi_mode=RoiMode(args.roi_mode))
    if args.threshold_hu is not None:
        analysis = replace(analysis, grading=replace(analysis.grading, threshold_hu=args.threshold_hu))
    options = AnalysisOptions(out_dir=args.out, mask=args.mask, mask_label=args.mask_label,
                              ignore_eligibility=args.ignore_eligibility, save_mask=args.save_mask,
                              save_ct=args.save_ct, write_preview=True, write_dicom=not args.no_dicom,
                              policy=node.eligibility, config=analysis)  # fmt: skip
    model = args.model or node.model.name
    precision = args.precision or node.model.precision
    run = ResearchRun(options, model=model, precision=precision, redo=args.force,
                      identifiers=not args.no_identifiers)  # fmt: skip

    def load_model() -> Backend:
        from liverfat.inference.models.registry import load_backend

        return load_backend(model, device=args.device or node.model.device, cache_dir=node.model.cache,
                            precision=precision)  # fmt: skip

    if args.broker is not None:
        return _analyze_on_fleet(args, run, replace(node.queue, broker=args.broker or node.queue.broker), load_model)
    keep_freed_memory(prefault_bytes=0)  # a run of many series reuses its memory, as a worker does (service/heap.py)
    result = analyze_inputs(args.inputs, run, load_model, ConsoleProgress())
    return _analyze_exit_status(result, args.out)


FLEET_LOCAL_ONLY = ("mask", "mask_label", "model", "device", "precision")  # options --broker refuses


def _analyze_on_fleet(args: argparse.Namespace, run: ResearchRun, queue: QueueSection,
                      load_model: BackendLoader) -> int:  # fmt: skip
    """``analyze --broker``: the DICOM series published to the fleet, their rows collected as they finish."""
    from liverfat.service.fleet.broker import BrokerClient, celery_app  # Celery only for --broker
    from liverfat.service.fleet.research import FleetRun

    local_only = [f"--{name.replace('_', '-')}" for name in FLEET_LOCAL_ONLY if getattr(args, name) is not None]
    if local_only:
        raise LiverfatError(Reason.CONFIG_INVALID, f"{', '.join(local_only)} cannot go with --broker: the "
                            "workers analyse with their own [model] (a --mask needs no model: run it without "
                            "--broker)")  # fmt: skip
    if not queue.broker:
        raise LiverfatError(Reason.CONFIG_INVALID, "--broker without a URL takes [queue] broker, which is not set "
                            "(LIVERFAT_QUEUE_BROKER=amqp://user:password@host:5672//)")  # fmt: skip
    client = BrokerClient(celery_app(queue))
    progress = ConsoleProgress()
    fleet = FleetRun(plan_run(args.inputs, run), client, progress)
    try:
        published = fleet.publish()
        if published:
            progress.note(f"liverfat: {published} series published to {redacted(queue.broker)} "
                          f"(replies in {fleet.reply_to}); collecting their results as the workers finish")  # fmt: skip
        result = fleet.collect(ModelCache(load_model))
    except KeyboardInterrupt:  # the workers carry on; their completions wait in the output folder's queue
        progress.note(f"liverfat: stopped with {len(fleet.waiting)} series in the fleet; the same command "
                      "records them as they finish")  # fmt: skip
        return 130
    finally:
        client.close()
    return _analyze_exit_status(result, args.out)


def _analyze_exit_status(result: RunResult, out: Path) -> int:
    """Report skipped inputs and problems on stderr; 1 when any needs the user, else 0."""
    _print_skipped(result.skipped, out)
    problems = []
    if not result.cases:
        problems.append("no CT series found in the inputs (no DICOM CT series, no NIfTI file)")
    if any(s.finding.code is Reason.NOT_FOUND for s in result.skipped):
        problems.append("an input does not exist")
    failed = [c for c in result.cases if c.status == Outcome.FAILED.value]
    if failed:
        problems.append(f"{len(failed)} of {len(result.cases)} series failed; see result.json in {out}")
    mismatched = [c for c in result.cases if Reason.MASK_MISMATCH.value in c.reason_codes]
    if mismatched:
        problems.append(f"the mask was rejected for {len(mismatched)} of {len(result.cases)} series (mask_mismatch)")
    for problem in problems:
        print(f"liverfat: {problem}", file=sys.stderr)
    if result.cases:
        print(f"liverfat: {len(result.cases)} series; results in {out / RESULTS_CSV}", file=sys.stderr)
    return 1 if problems else 0


def _print_skipped(skipped: Sequence[SkippedFile], out: Path, limit: int = 10) -> None:
    """Why each input file or folder that is no CT was skipped, one line each (``skipped.json`` has all)."""
    for item in skipped[:limit]:
        print(f"liverfat: skipped {item.finding.message} [{item.finding.code.value}]", file=sys.stderr)
    if len(skipped) > limit:
        print(f"liverfat: ... and {len(skipped) - limit} more skipped; see {out / SKIPPED_JSON}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
