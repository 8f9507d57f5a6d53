"""Benchmark of the node: its C-STORE receive rate against dcmtk's storescp, and the time from
"series complete" to "results stored in Orthanc", per stage.

1. Receive rate: dcmtk's storescu sends one phantom series (512 x 512 slices) to dcmtk's
   ``/usr/bin/storescp``, to a bare pynetdicom SCP (the node's AE settings, a C-STORE handler
   that stores nothing: the ceiling with pynetdicom) and to the node (a real ``liverfat`` node
   process, its worker idle), in turn, ``--repeat`` times each; the figure is instances per
   second of the storescu run, best of the repeats, and the ratios of the node to the other two.
   The node's answer includes an fsync of every file and a SQLite commit; storescp syncs
   nothing. The durability floor, timed between the runs: ``durable_write`` of one
   instance-size file (temp file, fsync, rename, folder fsync), median ms per instance.
2. Pipeline: a real Orthanc (private network namespace, ``tests/orthanc.py``) auto-routes the
   same series to the node with the deploy/ Lua script; the node runs ``--model`` and sends
   SEG, SR and key image back. Stages come from the node's spool (job and outbox times, the
   pipeline's own timers); "stored in Orthanc" is the last C-STORE Success from Orthanc (it
   answers once the instance is stored), and the results are then found through its REST API.

Run from the repository root (as root: the namespace needs it)::

    .venv/bin/python bench/bench_node.py [--slices 300] [--repeat 3] [--model default|phantom] [--json out.json]
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pynetdicom
from pynetdicom import evt
from pynetdicom.events import Event

# Run as a script, Python puts bench/ on sys.path; the phantom, Orthanc and node helpers live in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liverfat import __version__  # noqa: E402
from liverfat.files import durable_write  # noqa: E402
from liverfat.service.config import NodeSection  # noqa: E402
from liverfat.service.scp import StoreStatus, make_ae  # noqa: E402
from liverfat.service.spool import Job  # noqa: E402
from tests.orthanc import orthanc_server  # noqa: E402
from tests.phantom import Grid, Phantom, SeriesHeader, write_series  # noqa: E402
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
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle's algorithm on unless told


def write_phantom(folder: Path, slices: int, size: int = 512) -> list[Path]:
    positions = (np.arange(slices) - slices / 2) * SLICE_STEP_MM
    header = SeriesHeader(slice_thickness_mm=SLICE_STEP_MM)
    files: list[Path] = []
    for start in range(0, slices, CHUNK_SLICES):
        grid = Grid(rows=size, columns=size, pixel_spacing_mm=360.0 / size,
                    slice_positions_mm=tuple(positions[start : start + CHUNK_SLICES]))  # fmt: skip
        files += write_series(folder / f"part_{start:04d}", Phantom().with_liver_hu(LIVER_HU), grid, header)
    return files


def storescu_seconds(folder: Path, port: int, called: str) -> float:
    started = time.perf_counter()
    command = [STORESCU, "-aet", "BENCH", "-aec", called, "+sd", "+r", "127.0.0.1", str(port), str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, env=DCMTK_ENV, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {result.stderr[-2000:]}")
    return elapsed


def time_scp_process(command: list[str], series: Path, port: int, called: str) -> float:
    """storescu's time to send ``series`` to the SCP that ``command`` starts (and that is stopped after)."""
    server = subprocess.Popen(command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(port), 30, f"the {called} SCP to listen")
        return storescu_seconds(series, port, called)
    finally:
        server.terminate()
        server.wait(10)


def time_storescp(series: Path, work: Path, port: int) -> float:
    out = work / "storescp-out"
    out.mkdir()
    try:
        return time_scp_process([STORESCP, "-aet", "STORESCP", "-od", str(out), str(port)], series, port, "STORESCP")
    finally:
        shutil.rmtree(out)


def time_bare_pynetdicom(series: Path, work: Path, port: int) -> float:
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-bare-scp", str(port)]
    return time_scp_process(command, series, port, NodeSection().ae_title)


def serve_bare_scp(port: int) -> None:
    """The ceiling with pynetdicom: the node's AE settings, and a C-STORE handler that only answers Success."""
    ae = make_ae(NodeSection(host="127.0.0.1", port=port))
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, _store_nothing)])


def _store_nothing(event: Event) -> int:
    return int(StoreStatus.SUCCESS)


def time_node(series: Path, work: Path, port: int) -> float:
    node = NodeProcess(work / "node", {
        "node": {"host": "127.0.0.1", "port": port},
        "spool": {"dir": str(work / "node" / "spool"), "min_free_disk_mb": 0},
        "series": {"stable_seconds": 600.0},  # receive only: nothing is processed during the timing
        "http": {"port": 0},
    })  # fmt: skip
    node.start()
    try:
        return storescu_seconds(series, port, "LIVERFAT")
    finally:
        node.terminate()
        shutil.rmtree(work / "node")


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


RECEIVERS = {  # name in the JSON: (label, timing)
    "storescp": ("dcmtk storescp", time_storescp),
    "bare_pynetdicom": ("bare pynetdicom SCP", time_bare_pynetdicom),
    "node": ("liverfat node", time_node),
}


def receive_rates(series: Path, files: list[Path], work: Path, repeat: int) -> dict[str, Any]:
    from tests.service.conftest import free_port

    count = len(files)
    times: dict[str, list[float]] = {name: [] for name in RECEIVERS}
    writes: list[float] = []
    for _ in range(repeat):  # interleaved, so drift in machine load hits all alike
        for name, (_, time_receiver) in RECEIVERS.items():
            times[name].append(time_receiver(series, work, free_port()))
        writes += durable_write_seconds(files[0].read_bytes(), work / "durable-writes", count)
    best = {name: count / min(values) for name, values in times.items()}
    return {
        "instances": count,
        "best_instances_per_s": {name: round(rate, 1) for name, rate in best.items()},
        "median_instances_per_s": {name: round(count / statistics.median(v), 1) for name, v in times.items()},
        "best_ms_per_instance": {name: round(1000 / rate, 2) for name, rate in best.items()},
        "ratio_node_to_storescp": round(best["node"] / best["storescp"], 2),
        "ratio_node_to_bare_pynetdicom": round(best["node"] / best["bare_pynetdicom"], 2),
        "durable_write_ms_median": round(statistics.median(writes) * 1000, 2),
        "durable_writes": len(writes),
    }


def pipeline_stages(files: list[Path], work: Path, model: str) -> dict[str, Any]:
    """Store into Orthanc, let its Lua route to the node, wait for the results back in Orthanc."""
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
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
            orthanc.store(files, calling_aet="BENCH")
            # Polled slowly: a REST poll every 0.1 s costs Orthanc and this script enough CPU to slow the
            # segmentation's two threads by a third on a 2-core machine. The time itself is the node's.
            wait_for(lambda: _results_stored(orthanc, study_uid), 1800, "results in Orthanc", REST_POLL_S)
            job = wait_for(lambda: _finished_job(node), 60, "the job's record")
            spool = node.spool()
            sent = spool.query("SELECT sent_at FROM outbox WHERE job_id = ?", (job.id,))
            sent_at = max(row["sent_at"] for row in sent)
            spool.close()
        finally:
            node.terminate()
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
        "model": model,
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


def _finished_job(node: NodeProcess) -> Job | None:
    jobs = [job for job in node.jobs() if job.finished_at is not None]
    return jobs[0] if jobs else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="receive runs per SCP")
    parser.add_argument("--model", default="default", help="'default', another model name, or 'phantom' (no network)")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the receive rate (no Orthanc needed)")
    parser.add_argument("--json", type=Path, help="also write the figures and versions here")
    parser.add_argument("--serve-bare-scp", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the bench's own child
    args = parser.parse_args(argv)
    if args.serve_bare_scp is not None:
        serve_bare_scp(args.serve_bare_scp)
        return 0

    with tempfile.TemporaryDirectory(prefix="liverfat-bench-node-") as tmp:
        work = Path(tmp)
        files = write_phantom(work / "series", args.slices)
        receive = receive_rates(work / "series", files, work, args.repeat)
        pipeline = None if args.skip_pipeline else pipeline_stages(files, work, args.model)

    result = {
        "benchmark": "node",
        "series": f"{args.slices} slices 512x512 int16, explicit VR little endian (phantom, liver {LIVER_HU:g} HU)",
        "receive": receive,
        "pipeline": pipeline,
        "versions": {"liverfat": __version__, "pynetdicom": pynetdicom.__version__, "pydicom": pydicom.__version__,
                     "python": platform.python_version()},  # fmt: skip
        "machine": f"{platform.platform()}, {os.cpu_count()} CPU",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine slows all
    }
    rates, ms = receive["best_instances_per_s"], receive["best_ms_per_instance"]
    for name, (label, _) in RECEIVERS.items():
        print(f"receive, {label + ':':<21} {rates[name]:7.1f} instances/s = {ms[name]:5.2f} ms each "
              f"(best of {args.repeat})")  # fmt: skip
    load = os.getloadavg()[0]
    print(f"ratio node / storescp:        {receive['ratio_node_to_storescp']:.2f} (load average {load:.1f})")
    print(f"ratio node / bare pynetdicom: {receive['ratio_node_to_bare_pynetdicom']:.2f}: the node adds "
          f"{ms['node'] - ms['bare_pynetdicom']:.2f} ms per instance, of which the durability floor (durable_write "
          f"of one instance, median of {receive['durable_writes']}) is {receive['durable_write_ms_median']:.2f} ms")
    if pipeline is not None:
        print(f"pipeline with model {pipeline['model']!r}: grade {pipeline['grade']}, "
              f"DL-parenchymal {pipeline['parenchymal_hu']} HU")  # fmt: skip
        for name, value in pipeline["stages_s"].items():
            print(f"  {name:<75} {value:7.2f} s")
        print(f"  {'series complete -> results stored in Orthanc':<75} {pipeline['complete_to_stored_s']:7.2f} s")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
