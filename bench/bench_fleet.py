"""Benchmark of the fleet (Celery on RabbitMQ): jobs per minute with 1, 2 and 4 workers, and the hand-off latency.

1. Scaling on a fixed-cost backend: a real RabbitMQ (Debian package, ``tests/broker.py``, the
   repository's definitions) and 1, 2, then 4 fleet workers, each its own ``liverfat worker``
   process (``tests/service/fleet/worker_main.py``: the product's ``FleetWorker``, one CPU
   child, ``[worker] count = 1``), each with a ``[worker] name`` of its own (as workers on
   separate hosts have), whose segmentation is the phantom's analytic liver after a fixed
   sleep (``--delay-s``). The rest of each task is the real pipeline on the tests' 64 x 64 x 57
   phantom (load, resample, ROIs, SEG, SRs, key image, the completion published before the
   ack): about 1-2 s of CPU per series, which four workers on this machine's two shared cores
   cannot all get at once; the default sleep, 10 s, keeps that share small enough that the
   figure measures the hand-off rather than the cores (``--delay-s 2`` shows the cores).
   ``jobs`` tasks per worker are published at once; jobs per minute = tasks / (first publish
   -> last completion received). Efficiency at W workers = rate_W / (W x rate_1) (target
   >= 0.9 at 4). The queued hand-off: on each worker child, the time from one task's
   completion sent to the start of its next task (the ack, RabbitMQ's next delivery with
   prefetch 1, Celery's dispatch to the child), from the workers' JSON logs.
2. Hand-off latency: one idle worker (no sleep), ``--latency-samples`` tasks published one at a
   time; latency = the publisher's clock before ``publish_task`` (which waits for the broker's
   confirm) -> the worker child's "processing" log record (JSON log, millisecond clock, same
   machine); median and 95th percentile.
3. The real default model: ONE ``liverfat worker`` (the installed command) with
   ``[worker] devices = "cpu"`` and ``count`` 1, then 2 (the children split the cores), on a
   real series (``--real-series``, default LUNG-PET-CT-Dx A0001 from ../shared/data: 64 x 5 mm,
   512 x 512) or the 64-slice 512 x 512 phantom when it is absent; ``--real-jobs`` tasks each.

Run from the repository root with RabbitMQ's Debian package installed::

    .venv/bin/python bench/bench_fleet.py [--workers 1 2 4] [--delay-s 10] [--jobs 8] [--latency-samples 20]
        [--real-counts 1 2] [--real-jobs 4] [--real-series DIR] [--skip-real] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import celery
import kombu
import numpy as np
import pydicom

# Run as a script, Python puts bench/ on sys.path; the broker, phantom and process helpers live in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liverfat import __version__
from liverfat.service.config import NodeConfig, QueueSection
from liverfat.service.fleet.broker import BrokerClient, celery_app
from liverfat.service.fleet.messages import (
    Completion,
    SeriesTask,
    node_reply_queue,
    publisher_settings,
)
from tests.broker import RabbitMQ, rabbitmq_server
from tests.phantom import Grid, Phantom, write_series
from tests.service.conftest import phantom_series
from tests.service.node_process import REPO, toml, wait_for

PUBLISHER = "BENCH"
REPLY_TO = node_reply_queue(PUBLISHER)
READY_S = 600.0  # several workers importing torch and loading models at once on a busy 2-core machine
STOP_S = 120.0
COMPLETION_S = 1800.0
REAL_SERIES = REPO.parent / "shared" / "data" / "chest-ct" / "lung-pet-ct-dx-a0001"
PROCESSING = ": processing "  # the worker's log record as a task starts: "series UID vN: processing K file(s)"
SENT = "completion sent to"  # ... and once its completion is confirmed by the broker, just before the ack


@dataclass
class Worker:
    """One fleet worker process (its own session: stopped with all its children), its JSON log in a file."""

    command: list[str]
    log: Path
    children: int  # how many "model loaded" records mean ready
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)  # fmt: skip

    def ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}: {self.text()[-3000:]}")
        text = self.text()
        return " ready." in text and text.count("model loaded") >= self.children

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def records(self) -> Iterator[dict[str, Any]]:
        for line in self.text().splitlines():
            if line.startswith("{"):
                yield json.loads(line)

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL to whatever of its session is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=STOP_S)


def worker_config(folder: Path, broker: RabbitMQ, worker: Mapping[str, Any], model: Mapping[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "worker.toml"
    path.write_text(toml({"queue": {"broker": broker.url}, "worker": worker, "model": model,
                          "log": {"level": "INFO", "format": "json"}}))  # fmt: skip
    return path


def phantom_worker(folder: Path, broker: RabbitMQ, delay_s: float, name: str) -> Worker:
    """A fleet worker named ``name`` with one CPU child whose segmentation is the phantom's liver after ``delay_s``."""
    config = worker_config(folder, broker, {"devices": "cpu", "count": 1, "name": name}, {"device": "cpu"})
    command = [sys.executable, "-m", "tests.service.fleet.worker_main", str(config), "--delay-s", str(delay_s)]
    return Worker(command, folder / "worker.log", children=1)


def real_worker(folder: Path, broker: RabbitMQ, count: int) -> Worker:
    """``liverfat worker`` itself with the default model on ``count`` CPU children."""
    config = worker_config(folder, broker, {"devices": "cpu", "count": count}, {"name": "default", "device": "cpu"})
    command = [str(REPO / ".venv" / "bin" / "liverfat"), "worker", "--config", str(config)]
    return Worker(command, folder / "worker.log", children=count)


@contextmanager
def running(workers: Sequence[Worker]) -> Iterator[Sequence[Worker]]:
    """Start the workers at once, wait until each consumes with its models loaded; stop them after."""
    try:
        for worker in workers:
            worker.start()
        wait_for(lambda: all(worker.ready() for worker in workers), READY_S, f"{len(workers)} worker(s) ready", 0.5)
        yield workers
    finally:
        for worker in workers:
            worker.stop()


class Publisher:
    """Publishes series tasks as a node would and collects their completions from its reply queue."""

    def __init__(self, broker: RabbitMQ, root: Path) -> None:
        self.client = BrokerClient(celery_app(QueueSection(broker=broker.url)))
        self.client.declare(REPLY_TO)
        self.root = root
        self.settings = publisher_settings(NodeConfig())
        self.jobs = 0

    def publish(self, files: Sequence[Path], series_uid: str) -> tuple[str, float]:
        """A new task (its own job and version, so its own task id); its id and the clock before publishing."""
        self.jobs += 1
        task = SeriesTask.create(kind="node", publisher=PUBLISHER, series_uid=series_uid, version=self.jobs,
                                 files=files, out_dir=self.root / "results" / str(self.jobs), root=self.root,
                                 reply_to=REPLY_TO, settings=self.settings, job_id=self.jobs)  # fmt: skip
        published = time.time()
        self.client.publish_task(task)
        return task.task_id, published

    def collect(self, count: int) -> list[tuple[Completion, float]]:
        """Wait for ``count`` completions; each with the clock when it was taken from the queue."""
        received: list[tuple[Completion, float]] = []

        def take() -> bool:
            for delivery in self.client.fetch(REPLY_TO):
                received.append((delivery.completion, time.time()))
                delivery.ack()
            return len(received) >= count

        wait_for(take, COMPLETION_S, f"{count} completion(s)", interval=0.02)
        return received

    def run(self, files: Sequence[Path], series_uid: str, count: int, workers: Sequence[Worker]) -> dict[str, Any]:
        """``count`` tasks published at once; jobs per minute from the first publish to the last completion.

        ``busy``: the share of the run's time the worker children spent in tasks (sum of their
        processing times / (children x elapsed)); what is left is the hand-off and the run's ends.
        """
        first = self.publish(files, series_uid)[1]
        for _ in range(count - 1):
            self.publish(files, series_uid)
        done = self.collect(count)
        failed = [c.result.error for c, _ in done if c.result.state.value != "done"]
        if failed:
            raise RuntimeError(f"{len(failed)} task(s) failed: {failed[0]}")
        elapsed = max(at for _, at in done) - first
        processing = [c.result.processing_s for c, _ in done if c.result.processing_s is not None]
        gaps = np.array(queued_gaps(workers)) * 1000
        children = sum(worker.children for worker in workers)
        return {"jobs": count, "elapsed_s": round(elapsed, 2), "jobs_per_min": round(count / elapsed * 60, 2),
                "processing_s_median": round(statistics.median(processing), 2),
                "busy": round(sum(processing) / (children * elapsed), 3),
                "queued_handoff_ms_median": round(float(np.median(gaps)), 1) if gaps.size else None,
                "queued_handoff_ms_p95": round(float(np.percentile(gaps, 95)), 1) if gaps.size else None,
                "workers_seen": len({(c.worker.name, c.worker.pid) for c, _ in done if c.worker})}  # fmt: skip

    def close(self) -> None:
        self.client.close()


def task_starts(workers: Sequence[Worker]) -> dict[str, float]:
    """Each task's start on a worker: its "processing" log record's time (epoch seconds), by task id."""
    return {record["task"]: _epoch(record["time"]) for worker in workers for record in worker.records()
            if "task" in record and PROCESSING in record["message"]}  # fmt: skip


def queued_gaps(workers: Sequence[Worker]) -> list[float]:
    """Seconds from a task's completion sent to the same worker's next start, while tasks wait in the queue.

    The hand-off under load: the ack, RabbitMQ's next delivery (prefetch 1) and Celery's dispatch to the child.
    """
    children: dict[tuple[int, str], list[tuple[float, bool]]] = {}
    for number, worker in enumerate(workers):
        for record in worker.records():
            if "task" in record and (PROCESSING in record["message"] or SENT in record["message"]):
                events = children.setdefault((number, record["process"]), [])
                events.append((_epoch(record["time"]), SENT in record["message"]))
    return [start - end for events in children.values() for (end, sent), (start, started) in itertools.pairwise(events)
            if sent and not started]  # fmt: skip


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def handoff_latency(publisher: Publisher, workers: Sequence[Worker], files: Sequence[Path], series_uid: str,
                    samples: int) -> dict[str, Any]:  # fmt: skip
    """Tasks published one at a time to idle workers: publish -> the worker's start, milliseconds."""
    published = {}
    for _ in range(samples):
        task_id, at = publisher.publish(files, series_uid)
        published[task_id] = at
        publisher.collect(1)
    starts = task_starts(workers)
    latencies = np.array([(starts[task_id] - at) * 1000 for task_id, at in published.items()])
    return {"samples": samples, "median_ms": round(float(np.median(latencies)), 1),
            "p95_ms": round(float(np.percentile(latencies, 95)), 1), "max_ms": round(float(latencies.max()), 1)}  # fmt: skip


def fixed_cost(broker: RabbitMQ, work: Path, series: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    uid = str(pydicom.dcmread(series[0], stop_before_pixels=True).SeriesInstanceUID)
    publisher = Publisher(broker, work / "spool")
    runs: list[dict[str, Any]] = []
    latency = None
    try:
        for count in args.workers:
            workers = [phantom_worker(work / f"fixed-{count}" / f"worker-{n}", broker, args.delay_s, f"bench-{n}")
                       for n in range(count)]  # fmt: skip
            with running(workers):
                run = publisher.run(series, uid, args.jobs * count, workers)
                runs.append({"workers": count, **run})
                print(f"  {count} worker(s): {run['jobs_per_min']:.1f} jobs/min ({run['jobs']} jobs in "
                      f"{run['elapsed_s']:.1f} s, median processing {run['processing_s_median']:.2f} s, "
                      f"load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        if args.latency_samples:
            with running([phantom_worker(work / "latency", broker, 0.0, "bench-latency")]) as idle:
                latency = handoff_latency(publisher, idle, series, uid, args.latency_samples)
    finally:
        publisher.close()
    base = next((run["jobs_per_min"] for run in runs if run["workers"] == 1), None)
    for run in runs:
        run["efficiency"] = None if base is None else round(run["jobs_per_min"] / (run["workers"] * base), 3)
    return {"delay_s": args.delay_s, "series": f"phantom, {len(series)} slices 64x64", "runs": runs,
            "handoff_latency": latency}  # fmt: skip


def real_series(folder: Path | None, work: Path) -> tuple[list[Path], str]:
    """The real series' files (a folder of DICOM), or a 64-slice 512 x 512 phantom when there is none."""
    if folder is not None and folder.is_dir():
        return sorted(path for path in folder.rglob("*") if path.is_file() and _is_dicom(path)), str(folder)
    grid = Grid(rows=512, columns=512, pixel_spacing_mm=360 / 512, slice_positions_mm=tuple(np.arange(64) * 5.0 - 160))
    return write_series(work / "real-phantom", Phantom(), grid), "phantom 64 x 512 x 512, 5 mm (no real series found)"


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(132)[128:132] == b"DICM"


def real_model(broker: RabbitMQ, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    files, described = real_series(args.real_series, work)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    publisher = Publisher(broker, work / "spool-real")
    runs = []
    try:
        for count in args.real_counts:
            with running([real_worker(work / f"real-{count}", broker, count)]) as workers:
                run = publisher.run(files, uid, args.real_jobs, workers)
            runs.append({"children": count, **run})
            print(f"  1 worker, {count} CPU child(ren): {run['jobs_per_min']:.2f} jobs/min ({run['jobs']} jobs in "
                  f"{run['elapsed_s']:.1f} s, median processing {run['processing_s_median']:.1f} s)", flush=True)  # fmt: skip
    finally:
        publisher.close()
    return {"series": described, "files": len(files), "model": "default", "runs": runs}


def print_report(result: dict[str, Any]) -> None:
    fixed = result["fixed_cost"]
    if fixed is not None:
        print(f"fixed-cost backend ({fixed['delay_s']:g} s per series, {fixed['series']}):")
        print(f"  {'workers':>7} {'jobs':>5} {'jobs/min':>9} {'efficiency':>10} {'processing':>10} {'busy':>6} "
              f"{'queued hand-off median / p95':>28}")  # fmt: skip
        for run in fixed["runs"]:
            efficiency = "-" if run["efficiency"] is None else f"{run['efficiency']:.3f}"  # no 1-worker run to compare
            print(f"  {run['workers']:>7} {run['jobs']:>5} {run['jobs_per_min']:>9.1f} {efficiency:>10} "
                  f"{run['processing_s_median']:>8.2f} s {run['busy']:>6.3f} {run['queued_handoff_ms_median']:>16.1f} / "
                  f"{run['queued_handoff_ms_p95']:.1f} ms")  # fmt: skip
        print(f"  (processing: one series on a worker, median; {fixed['delay_s']:g} s of it is the fixed sleep, the rest "
              f"is the real pipeline's CPU work on the phantom, which {os.cpu_count()} shared cores must carry)")  # fmt: skip
        latency = fixed["handoff_latency"]
        if latency is not None:
            print(f"hand-off latency, publish -> task start ({latency['samples']} tasks one at a time, idle worker): "
                  f"median {latency['median_ms']:.1f} ms, p95 {latency['p95_ms']:.1f} ms, max {latency['max_ms']:.1f} ms")  # fmt: skip
    real = result["real_model"]
    if real is not None:
        print(f"default model, one worker on this machine's {os.cpu_count()} cores, {real['series']}:")
        for run in real["runs"]:
            print(f"  {run['children']} child(ren): {run['jobs_per_min']:.2f} jobs/min, "
                  f"median processing {run['processing_s_median']:.1f} s per series, busy {run['busy']:.3f}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="fleet worker counts (fixed cost)")
    parser.add_argument("--delay-s", type=float, default=10.0, help="the fixed cost of one segmentation")
    parser.add_argument("--jobs", type=int, default=8, help="tasks per worker in each fixed-cost run")
    parser.add_argument("--latency-samples", type=int, default=20, help="tasks published one at a time (0: none)")
    parser.add_argument("--real-counts", type=int, nargs="+", default=[1, 2], help="CPU children, default model")
    parser.add_argument("--real-jobs", type=int, default=4, help="tasks in each default-model run")
    parser.add_argument("--real-series", type=Path, default=REAL_SERIES, help="a folder of one real CT series")
    parser.add_argument("--skip-fixed", action="store_true", help="only the default model")
    parser.add_argument("--skip-real", action="store_true", help="only the fixed-cost scaling and the latency")
    parser.add_argument("--json", type=Path, help="also write the figures and versions here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="liverfat-bench-fleet-") as tmp:
        work = Path(tmp)
        with rabbitmq_server(work / "broker") as broker:
            rabbitmq = broker.ctl("version").strip()
            fixed = None if args.skip_fixed else fixed_cost(broker, work, phantom_series(work / "series"), args)
            real = None if args.skip_real else real_model(broker, work, args)

    versions = {"liverfat": __version__, "celery": celery.__version__, "kombu": kombu.__version__,
                "rabbitmq": rabbitmq, "python": platform.python_version()}  # fmt: skip
    result = {
        "benchmark": "fleet",
        "fixed_cost": fixed,
        "real_model": real,
        "versions": versions,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine slows all
    }
    print_report(result)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
