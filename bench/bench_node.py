"""Benchmark of the node: its C-STORE receive rate against Orthanc and dcmtk's storescp, and the time from
"series complete" to "results stored in Orthanc", per stage, optionally beside a baseline commit's.

1. Receive rate: dcmtk's storescu sends phantom series (512 x 512 slices) to each receiver in
   turn: dcmtk's ``/usr/bin/storescp`` (writes, syncs nothing), a bare pynetdicom SCP (the node's
   contexts, a C-STORE handler that stores nothing: pynetdicom's acceptor, which the node used before
   its own upper layer), Orthanc
   (Debian package, default ``SyncStorageArea``: the durable peer) and the node (a real
   ``liverfat`` node process, its worker idle). Orthanc 1.10 waits for the disk once per
   instance (strace: 53 ``fdatasync`` for 50 instances, no other sync call): its SQLite index
   runs WAL with ``SYNCHRONOUS=NORMAL``, whose commits a power loss can undo. The node waits
   once: the fsyncs of file and folder and its index's commit (WAL, ``synchronous=FULL``) at once.
   Once over one association, once as four
   series sent at once by four storescu (a PACS that sends several series at once). Each
   receiver starts empty for each timing; ``--repeat`` rounds, interleaved; the figure is
   instances per second of the storescu runs, best of the repeats, and the ratios of the node to
   Orthanc, storescp and the bare SCP. Every dcmtk program, Orthanc included, runs with
   ``TCP_NODELAY=1`` (without it dcmtk leaves Nagle's algorithm on and Orthanc answers ten times
   slower). The durability floor, timed between the rounds: ``durable_write`` of one
   instance-size file (temp file, fsync, rename, folder fsync), median ms per instance.
   ``--receivers 1 2`` times the node once per ``[node] receivers`` value (default: its default).
2. Pipeline: a real Orthanc (private network namespace, ``tests/orthanc.py``) auto-routes the
   same series to the node with the deploy/ Lua script; the node runs ``--model`` and sends
   SEG, SR and key image back. Stages come from the node's spool (job and outbox times, the
   pipeline's own timers); "stored in Orthanc" is the last C-STORE Success from Orthanc (it
   answers once the instance is stored), and the results are then found through its REST API.
3. ``--baseline REV``: the same pipeline, on the same series files, run by the code of commit
   REV (a ``git worktree`` at ``/tmp/liverfat-baseline-REV``, with the same .venv), right after
   this tree's, ``--pipeline-repeat`` times, alternating (the fastest run of each kept); the
   per-stage table side by side and the ratio new/baseline of "series complete -> stored".
   The baseline runs this script's pipeline step in a child process whose imports
   (liverfat and tests) resolve to the worktree: ``LIVERFAT_BENCH_ROOT`` names it, and links
   in its ``liverfat/`` to its mapped packages keep the editable install (this tree) out.

Run from the repository root (as root: the namespace needs it)::

    .venv/bin/python bench/bench_node.py [--slices 300] [--repeat 3] [--model default|phantom]
        [--skip-receive] [--skip-pipeline] [--receivers N ...] [--baseline 1956b86] [--pipeline-repeat 1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pynetdicom
from pynetdicom import evt
from pynetdicom.events import Event

# Run as a script, Python puts bench/ on sys.path; the phantom, Orthanc and node helpers live in tests/.
# A baseline run names its worktree instead, so that liverfat and tests are that commit's.
BENCH_ROOT = Path(os.environ.get("LIVERFAT_BENCH_ROOT") or Path(__file__).resolve().parents[1])
sys.path.insert(0, str(BENCH_ROOT))

from liverfat import __version__  # noqa: E402
from liverfat.files import durable_write  # noqa: E402
from liverfat.service.config import NodeSection  # noqa: E402
from liverfat.service.scp import StoreStatus  # noqa: E402
from liverfat.service.spool import Job  # noqa: E402
from tests.orthanc import orthanc_server  # noqa: E402
from tests.phantom import Grid, Phantom, SeriesHeader, write_series  # noqa: E402
from tests.service.conftest import free_port  # noqa: E402
from tests.service.node_process import REPO, NodeProcess, wait_for  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
SLICE_STEP_MM = 1.0
CHUNK_SLICES = 20  # slices rendered at once, to bound the phantom's memory
LIVER_HU = 32.0
AUTOROUTE = REPO / "deploy" / "orthanc" / "autoroute.lua"
NODE_PORT = 11112
RESULT_MODALITIES = ("OT", "SEG", "SR")
REST_POLL_S = 1.0
CONCURRENT_ASSOCIATIONS = (1, 4)  # one series over one association; four series sent at once by four storescu
BASELINE_WORKTREE = "/tmp/liverfat-baseline-{rev}"
MAPPED_PACKAGES = ("dicom_io", "inference", "service")  # pyproject package-dir: liverfat.<name> is <name>/
os.environ["TCP_NODELAY"] = "1"  # dcmtk leaves Nagle's algorithm on unless told: storescu, storescp, Orthanc
DCMTK_ENV = dict(os.environ)


def write_phantom(folder: Path, slices: int, size: int = 512) -> list[Path]:
    positions = (np.arange(slices) - slices / 2) * SLICE_STEP_MM
    header = SeriesHeader(slice_thickness_mm=SLICE_STEP_MM)
    files: list[Path] = []
    for start in range(0, slices, CHUNK_SLICES):
        grid = Grid(rows=size, columns=size, pixel_spacing_mm=360.0 / size,
                    slice_positions_mm=tuple(positions[start : start + CHUNK_SLICES]))  # fmt: skip
        files += write_series(folder / f"part_{start:04d}", Phantom().with_liver_hu(LIVER_HU), grid, header)
    return files


def copy_as_new_series(files: list[Path], folder: Path, new_study: bool = False) -> Path:
    """The same slices as another series of the same study (or of a new one): new Series and SOP Instance UIDs."""
    folder.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    study_uid = pydicom.uid.generate_uid() if new_study else None
    for number, path in enumerate(files):
        dataset = pydicom.dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        dataset.StudyInstanceUID = study_uid or dataset.StudyInstanceUID
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        dataset.save_as(folder / f"{number:04d}.dcm")
    return folder


@dataclass(frozen=True)
class Target:
    """A running C-STORE SCP: its AE title and port, and the network namespace it is reached in."""

    called: str
    port: int
    netns: str | None = None
    indexed: Callable[[], int] | None = None  # how many instances it holds, where it can say (the node)


def send_seconds(target: Target, folders: Sequence[Path]) -> float:
    """storescu's time to send each folder over its own association, all at once (one storescu each)."""
    command = [STORESCU, "-aet", "BENCH", "-aec", target.called, "+sd", "+r", "127.0.0.1", str(target.port)]
    prefix = ["ip", "netns", "exec", target.netns] if target.netns else []
    started = time.perf_counter()
    senders = [subprocess.Popen([*prefix, *command, str(folder)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for folder in folders]  # fmt: skip
    errors = [sender.communicate()[1] for sender in senders]
    elapsed = time.perf_counter() - started
    failed = [error for sender, error in zip(senders, errors, strict=True) if sender.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu to {target.called} failed: {failed[0][-2000:]}")
    return elapsed


@contextmanager
def scp_process(command: list[str], port: int, called: str) -> Iterator[Target]:
    """The SCP that ``command`` starts, stopped after."""
    server = subprocess.Popen(command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(port), 30, f"the {called} SCP to listen")
        yield Target(called, port)
    finally:
        server.terminate()
        server.wait(10)


@contextmanager
def storescp_receiver(work: Path) -> Iterator[Target]:
    """dcmtk's storescp: writes each instance, syncs nothing."""
    out, port = work / "storescp-out", free_port()
    out.mkdir()
    try:
        with scp_process([STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)], port, "STORESCP") as target:
            yield target
    finally:
        shutil.rmtree(out)


@contextmanager
def bare_pynetdicom_receiver(work: Path) -> Iterator[Target]:
    """pynetdicom's own acceptor (the node's before its upper layer): its contexts, a handler that stores nothing."""
    port = free_port()
    with scp_process([sys.executable, str(Path(__file__).resolve()), "--serve-bare-scp", str(port)], port,
                     NodeSection().ae_title) as target:  # fmt: skip
        yield target


def serve_bare_scp(port: int) -> None:
    # imported here: a baseline run imports this module with its own liverfat, which may predate it
    from liverfat.service.scp import acceptor_settings

    node = NodeSection(host="127.0.0.1", port=port)
    ae = pynetdicom.AE(ae_title=node.ae_title)
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs (pynetdicom docs/examples/storage.rst)
    ae.supported_contexts = list(acceptor_settings(node).supported_contexts)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, _store_nothing)])


def _store_nothing(event: Event) -> int:
    return int(StoreStatus.SUCCESS)


@contextmanager
def orthanc_receiver(work: Path) -> Iterator[Target]:
    """Orthanc (Debian package), default SyncStorageArea: the file's data synced before Success (not its index)."""
    with orthanc_server(work / "orthanc") as server:
        yield Target(server.aet, server.dicom_port, server.netns)
    shutil.rmtree(work / "orthanc")


@contextmanager
def node_receiver(work: Path, receivers: int | None = None) -> Iterator[Target]:
    """A real node process, its worker idle: file and folder fsynced and the SQLite commit, all before Success.

    ``receivers``: its ``[node] receivers`` (``None``: the default).
    """
    port = free_port()
    process = NodeProcess(work / "node", {
        "node": {"host": "127.0.0.1", "port": port, **({} if receivers is None else {"receivers": receivers})},
        "spool": {"dir": str(work / "node" / "spool"), "min_free_disk_mb": 0},
        "series": {"stable_seconds": 600.0},  # receive only: nothing is processed during the timing
        "http": {"port": 0},
    })  # fmt: skip
    process.start()
    try:
        yield Target(process.config.node.ae_title, port, indexed=lambda: _indexed(process))
    finally:
        process.terminate()
        shutil.rmtree(work / "node")


def _indexed(process: NodeProcess) -> int:
    spool = process.spool()
    try:
        return int(spool.query("SELECT COUNT(*) FROM instances")[0][0])
    finally:
        spool.close()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def durable_write_seconds(data: bytes, folder: Path, count: int) -> list[float]:
    """``count`` durable writes of ``data`` into a spool-like folder (temporary files beside it), one time each."""
    (folder / "tmp").mkdir(parents=True)
    seconds = []
    for i in range(count):
        started = time.perf_counter()
        durable_write(folder / "instances" / f"{i}.dcm", data, folder / "tmp")
        seconds.append(time.perf_counter() - started)
    shutil.rmtree(folder)
    return seconds


Receivers = dict[str, tuple[str, Callable[[Path], AbstractContextManager[Target]]]]  # by name in the JSON
PEERS: Receivers = {
    "storescp": ("dcmtk storescp (no fsync)", storescp_receiver),
    "bare_pynetdicom": ("bare pynetdicom SCP", bare_pynetdicom_receiver),
    "orthanc": ("Orthanc (syncs the file)", orthanc_receiver),
}


def receivers_timed(node_receivers: Sequence[int]) -> Receivers:
    """The peers, and the node once per ``[node] receivers`` value (``"node"`` alone for its default)."""
    if not node_receivers:
        return {**PEERS, "node": ("liverfat node", node_receiver)}
    return {**PEERS, **{f"node_receivers_{n}": (f"liverfat node, receivers={n}", partial(node_receiver, receivers=n))
                        for n in node_receivers}}  # fmt: skip


def receive_rates(series: list[Path], files: list[Path], work: Path, repeat: int,
                  receivers: Receivers) -> dict[str, Any]:  # fmt: skip
    """Instances per second into each receiver, best of ``repeat``, for each number of concurrent associations."""
    figures: dict[int, dict[str, list[float]]] = {}
    writes: list[float] = []
    for _ in range(repeat):  # interleaved, so drift in machine load hits all alike
        for associations in CONCURRENT_ASSOCIATIONS:
            for name, (_, serve) in receivers.items():
                with serve(work) as target:
                    seconds = send_seconds(target, series[:associations])
                    held = None if target.indexed is None else target.indexed()
                if held is not None and held != len(files) * associations:  # every Success must be held
                    raise RuntimeError(f"{name} answered Success for {len(files) * associations} instances, "
                                       f"holds {held}")  # fmt: skip
                figures.setdefault(associations, {}).setdefault(name, []).append(seconds)
        writes += durable_write_seconds(files[0].read_bytes(), work / "durable-writes", len(files))
    result: dict[str, Any] = {"instances_per_series": len(files)}
    for associations, times in figures.items():
        count = len(files) * associations
        best = {name: count / min(seconds) for name, seconds in times.items()}
        result[f"associations_{associations}"] = {
            "instances": count,
            "best_instances_per_s": {name: round(rate, 1) for name, rate in best.items()},
            "median_instances_per_s": {name: round(count / statistics.median(v), 1) for name, v in times.items()},
            "best_ms_per_instance": {name: round(1000 / rate, 2) for name, rate in best.items()},
            **{
                f"ratio_{node}_to_{peer}": round(best[node] / best[peer], 2)
                for node in best
                if node.startswith("node")
                for peer in PEERS
            },  # fmt: skip
        }
    result["durable_write_ms_median"] = round(statistics.median(writes) * 1000, 2)
    result["durable_writes"] = len(writes)
    return result


def pipeline_stages(files: list[Path], work: Path, model: str) -> dict[str, Any]:
    """Store into Orthanc, let its Lua route to the node, wait for the results back in Orthanc (both start empty).

    Then the same slices again as a series of another study, through the same node: the first
    series is the first its worker processes after starting, the next one what it does from then on.
    """
    run = Path(tempfile.mkdtemp(prefix="pipeline-", dir=work))
    try:
        return _pipeline_run(files, run, model)
    finally:
        shutil.rmtree(run)


def _pipeline_run(files: list[Path], work: Path, model: str) -> dict[str, Any]:
    next_files = sorted(copy_as_new_series(files, work / "next-series", new_study=True).glob("*.dcm"))
    modalities = {"LIVERFAT": {"AET": "LIVERFAT", "Host": "127.0.0.1", "Port": NODE_PORT}}
    with orthanc_server(work / "orthanc", modalities=modalities, lua_scripts=[AUTOROUTE]) as orthanc:
        node = NodeProcess(work / "pipeline-node", {
            "node": {"host": "127.0.0.1", "port": NODE_PORT, "allowed_callers": ["ORTHANC@127.0.0.1"]},
            "spool": {"dir": str(work / "pipeline-node" / "spool"), "min_free_disk_mb": 0},
            "series": {"stable_seconds": 10.0, "complete_on_release": True},
            "model": {"name": "default" if model == "phantom" else model},
            "send": {"destinations": [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"]},
            "http": {"port": 0},
        }, netns=orthanc.netns)  # fmt: skip
        node.start(real_model=model != "phantom")
        try:
            first = _through_node(orthanc, node, files)
            following = _through_node(orthanc, node, next_files)
        finally:
            node.terminate()
    return {"model": model, **first, "next_series": following}


def _through_node(orthanc: Any, node: NodeProcess, files: list[Path]) -> dict[str, Any]:
    """One series stored into Orthanc, routed to the node and back: its grade and stages."""
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    orthanc.store(files, calling_aet="BENCH")
    # Polled slowly: a REST poll every 0.1 s costs Orthanc and this script enough CPU to slow the
    # segmentation's two threads by a third on a 2-core machine. The time itself is the node's.
    wait_for(lambda: _results_stored(orthanc, header.StudyInstanceUID), 1800, "results in Orthanc", REST_POLL_S)
    job = wait_for(lambda: _finished_job(node, header.SeriesInstanceUID), 60, "the job's record")
    spool = node.spool()
    sent = spool.query("SELECT sent_at FROM outbox WHERE job_id = ?", (job.id,))
    sent_at = max(row["sent_at"] for row in sent)
    spool.close()
    assert job.completed_at is not None and job.started_at is not None and job.finished_at is not None
    timed = dict(job.timings)
    stages = {"queue (complete -> worker)": job.started_at - job.completed_at}
    labels = {"discover": "discover (headers, eligibility)", "load": "load (pixels to HU)",
              "resample": "resample to 0.7 x 0.7 x 2.5 mm", "segment": "segment (liver model)", "rois": "place ROIs",
              "measure": "measure", "grade": "grade", "masks": "masks back to the source grid",
              "write": "write SEG, SRs, key image"}  # fmt: skip
    stages.update({label: timed[name] for name, label in labels.items() if name in timed})
    timed_total = sum(timed[name] for name in labels if name in timed)
    stages["other (eligibility, fsync of outputs, record, queue)"] = job.finished_at - job.started_at - timed_total
    stages["send (C-STORE to Orthanc)"] = sent_at - job.finished_at
    return {
        "grade": job.grade,
        "parenchymal_hu": None if job.parenchymal_hu is None else round(job.parenchymal_hu, 1),
        "stages_s": {name: round(value, 2) for name, value in stages.items()},
        "complete_to_stored_s": round(sent_at - job.completed_at, 2),
    }


def _results_stored(orthanc: Any, study_uid: str) -> float | None:
    modalities = set()
    for study in orthanc.get("/studies?expand"):
        if study["MainDicomTags"]["StudyInstanceUID"] == study_uid:
            modalities |= {s["MainDicomTags"]["Modality"] for s in orthanc.get(f"/studies/{study['ID']}/series")}
    return time.time() if set(RESULT_MODALITIES) <= modalities else None


def _finished_job(node: NodeProcess, series_uid: str) -> Job | None:
    jobs = [job for job in node.jobs() if job.series_uid == series_uid and job.finished_at is not None]
    return jobs[0] if jobs else None


def baseline_worktree(rev: str) -> Path:
    """A worktree of commit ``rev`` whose ``liverfat/`` finds its own mapped packages (made once, kept)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    tree = Path(BASELINE_WORKTREE.format(rev=commit))
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                       capture_output=True)  # fmt: skip
    # The editable install maps liverfat.service (and the others) to this tree's folders; a package
    # that finds them in its own folder first never asks it.
    for name in MAPPED_PACKAGES:
        link = tree / "liverfat" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)
    return tree


def baseline_pipeline(tree: Path, series: Path, work: Path, model: str) -> dict[str, Any]:
    """This script's pipeline step on ``series``, run by the code in ``tree`` (a child process)."""
    out = work / "baseline-pipeline.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--pipeline-only", str(series), "--model", model,
               "--json", str(out)]  # fmt: skip
    subprocess.run(command, cwd=tree, env={**os.environ, "LIVERFAT_BENCH_ROOT": str(tree), "PYTHONPATH": str(tree)},
                   check=True)  # fmt: skip
    pipeline: dict[str, Any] = json.loads(out.read_text())["pipeline"]
    return pipeline


def _faster(best: dict[str, Any] | None, run: dict[str, Any]) -> dict[str, Any]:
    """The run with the shorter "series complete -> stored", every run's time listed; the same for the next series."""
    kept = _fastest(best, run)
    return {**kept, "next_series": _fastest(best["next_series"] if best else None, run["next_series"])}


def _fastest(best: dict[str, Any] | None, run: dict[str, Any]) -> dict[str, Any]:
    runs = [*(best["complete_to_stored_runs_s"] if best else []), run["complete_to_stored_s"]]
    kept = run if best is None or run["complete_to_stored_s"] < best["complete_to_stored_s"] else best
    return {**kept, "complete_to_stored_runs_s": runs}


def print_receive(receive: dict[str, Any], repeat: int, receivers: Receivers) -> None:
    for associations in CONCURRENT_ASSOCIATIONS:
        figures = receive[f"associations_{associations}"]
        rates, ms = figures["best_instances_per_s"], figures["best_ms_per_instance"]
        print(f"receive, {associations} association(s) at once, {figures['instances']} instances, best of {repeat}:")
        for name, (label, _) in receivers.items():
            print(f"  {label + ':':<34} {rates[name]:7.1f} instances/s = {ms[name]:5.2f} ms each")
        for node in (name for name in receivers if name.startswith("node")):
            for peer, (label, _) in PEERS.items():
                print(
                    f"  ratio {receivers[node][0]} / {label.split(' (')[0]}: {figures[f'ratio_{node}_to_{peer}']:.2f}"
                )
    print(f"durability floor: durable_write of one instance, median of {receive['durable_writes']}: "
          f"{receive['durable_write_ms_median']:.2f} ms")  # fmt: skip


def print_pipeline(pipeline: dict[str, Any], baseline: dict[str, Any] | None, rev: str | None) -> None:
    print(f"pipeline with model {pipeline['model']!r}: grade {pipeline['grade']}, "
          f"DL-parenchymal {pipeline['parenchymal_hu']} HU")  # fmt: skip
    if baseline is not None:
        print(f"baseline {rev}: grade {baseline['grade']}, DL-parenchymal {baseline['parenchymal_hu']} HU")
    print("the first series after the node starts:")
    _print_stages(pipeline, baseline)
    print("the next series (another study, same slices), the node's worker as it stays from then on:")
    _print_stages(pipeline["next_series"], baseline["next_series"] if baseline else None)


def _print_stages(pipeline: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    stages = list(dict.fromkeys([*pipeline["stages_s"], *(baseline["stages_s"] if baseline else {})]))
    header = f"  {'stage':<60} {'this tree':>9}" + (f" {'baseline':>9} {'new/base':>8}" if baseline else "")
    print(header)
    rows = [(name, pipeline["stages_s"].get(name), baseline["stages_s"].get(name) if baseline else None)
            for name in stages]  # fmt: skip
    rows.append(("series complete -> results stored in Orthanc", pipeline["complete_to_stored_s"],
                 baseline["complete_to_stored_s"] if baseline else None))  # fmt: skip
    for name, new, old in rows:
        line = f"  {name:<60} {_seconds(new)}"
        if baseline is not None:
            ratio = f"{new / old:8.2f}" if new is not None and old else f"{'':>8}"
            line += f" {_seconds(old)} {ratio}"
        print(line)
    print(f"  runs, series complete -> stored (fastest kept): this tree {pipeline['complete_to_stored_runs_s']}"
          + (f", baseline {baseline['complete_to_stored_runs_s']}" if baseline else ""))  # fmt: skip
    if baseline is not None:
        print(f"  ratio new / baseline, series complete -> stored: "
              f"{pipeline['complete_to_stored_s'] / baseline['complete_to_stored_s']:.2f}")  # fmt: skip


def _seconds(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:7.2f} s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="receive rounds (every receiver, 1 and 4 associations)")
    parser.add_argument("--model", default="default", help="'default', another model name, or 'phantom' (no network)")
    parser.add_argument("--skip-receive", action="store_true", help="only the pipeline")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the receive rates")
    parser.add_argument(
        "--receivers",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="time the node with each of these [node] receivers values (default: its default)",
    )
    parser.add_argument("--baseline", metavar="REV", help="also run the pipeline with commit REV's code (1956b86)")
    parser.add_argument("--pipeline-repeat", type=int, default=1, help="pipeline runs (each tree), the fastest kept")
    parser.add_argument("--json", type=Path, help="also write the figures and versions here")
    parser.add_argument("--serve-bare-scp", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the bench's own child
    parser.add_argument("--pipeline-only", type=Path, metavar="SERIES", help=argparse.SUPPRESS)  # a baseline's child
    args = parser.parse_args(argv)
    if args.serve_bare_scp is not None:
        serve_bare_scp(args.serve_bare_scp)
        return 0
    if args.pipeline_only is not None:
        with tempfile.TemporaryDirectory(prefix="liverfat-bench-baseline-") as tmp:
            files = sorted(path for path in args.pipeline_only.rglob("*.dcm"))
            args.json.write_text(json.dumps({"pipeline": pipeline_stages(files, Path(tmp), args.model)}))
        return 0

    tree = baseline_worktree(args.baseline) if args.baseline and not args.skip_pipeline else None
    with tempfile.TemporaryDirectory(prefix="liverfat-bench-node-") as tmp:
        work = Path(tmp)
        files = write_phantom(work / "series", args.slices)
        receive = None
        if not args.skip_receive:
            series = [work / "series"]
            series += [
                copy_as_new_series(files, work / f"series-{n}") for n in range(2, max(CONCURRENT_ASSOCIATIONS) + 1)
            ]
            receive = receive_rates(series, files, work, args.repeat, receivers_timed(args.receivers))
            for folder in series[1:]:
                shutil.rmtree(folder)
        pipeline = baseline = None
        for _ in range(0 if args.skip_pipeline else args.pipeline_repeat):  # alternating, as the receive rounds
            pipeline = _faster(pipeline, pipeline_stages(files, work, args.model))
            if tree is not None:
                baseline = _faster(baseline, baseline_pipeline(tree, work / "series", work, args.model))

    result = {
        "benchmark": "node",
        "series": f"{args.slices} slices 512x512 int16, explicit VR little endian (phantom, liver {LIVER_HU:g} HU)",
        "receive": receive,
        "pipeline": pipeline,
        "baseline": None if baseline is None else {"rev": args.baseline, "pipeline": baseline},
        "versions": {
            "liverfat": __version__,
            "pynetdicom": pynetdicom.__version__,
            "pydicom": pydicom.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine slows all
    }
    if receive is not None:
        print_receive(receive, args.repeat, receivers_timed(args.receivers))
    if pipeline is not None:
        print_pipeline(pipeline, baseline, args.baseline)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
