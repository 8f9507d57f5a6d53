"""``liverfat analyze --broker``: a real RabbitMQ, a real ``liverfat worker`` (phantom backend), the real CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import SimpleITK as sitk

from liverfat.analysis import AnalysisOptions, ModelCache
from liverfat.errors import Reason
from liverfat.service.config import NodeConfig, QueueSection, load_config
from liverfat.service.fleet.broker import BrokerClient, celery_app
from liverfat.service.fleet.messages import SERIES_QUEUE, research_reply_queue
from liverfat.service.fleet.research import FleetRun, research_settings
from liverfat.service.research import ResearchRun, analyze_inputs, plan_run
from liverfat.service.series_job import ResearchOptions, analyze_series_files
from tests.broker import RabbitMQ
from tests.phantom import Grid, Phantom, SeriesHeader, render_volume
from tests.service.conftest import phantom_series
from tests.service.fake_backend import PhantomLiverBackend
from tests.service.fleet.worker_process import WorkerProcess
from tests.service.node_process import wait_for
from tests.service.test_research import no_model

pytestmark = pytest.mark.slow  # a real broker, a real Celery worker, the real pipeline on phantom series

FATTY, NORMAL = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"
COLLECT_S = 240.0  # both series through one CPU worker child on a busy 2-core machine, or a dead letter's kills


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding two phantom series: a fatty liver (34 HU) and a normal one (60 HU)."""
    root = tmp_path_factory.mktemp("ct")
    phantom_series(root / "fatty", SeriesHeader(series_uid=FATTY), liver_hu=34.0)
    phantom_series(root / "normal", SeriesHeader(series_uid=NORMAL), liver_hu=60.0)
    return root


@pytest.fixture
def fleet(tmp_path: Path, broker: RabbitMQ) -> Iterator[WorkerProcess]:
    """One ``liverfat worker`` (one CPU child), not yet started; stopped after the test."""
    sections = {"queue": {"broker": broker.url}, "worker": {"devices": "cpu", "count": 1}, "log": {"level": "INFO"}}
    worker = WorkerProcess(tmp_path / "worker", sections)
    yield worker
    worker.stop()


def analyze_command(inputs: Path, out: Path) -> list[str]:
    """``liverfat analyze INPUT --out OUT --broker``: the URL from ``LIVERFAT_QUEUE_BROKER``, off the command line."""
    return [sys.executable, "-m", "liverfat.service.cli", "analyze", str(inputs), "--out", str(out), "--broker"]


def collector_env(broker: RabbitMQ) -> dict[str, str]:
    return {**os.environ, "LIVERFAT_QUEUE_BROKER": broker.url}


def analyze(broker: RabbitMQ, inputs: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """Run the collector until it has every row; its password must not appear in what it printed."""
    done = subprocess.run(analyze_command(inputs, out), env=collector_env(broker), capture_output=True, text=True,
                          timeout=COLLECT_S, check=False)  # fmt: skip
    assert broker.password not in done.stdout + done.stderr
    return done


def rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open(newline="") as file:
        return {row["folder"]: row for row in csv.DictReader(file)}


def local_run(out: Path) -> ResearchRun:
    """The run ``liverfat analyze INPUT --out OUT`` makes of this environment's configuration (as cmd_analyze)."""
    config = load_config()
    options = AnalysisOptions(out_dir=out, write_preview=True, policy=config.eligibility, config=config.analysis)
    return ResearchRun(options, model=config.model.name, precision=config.model.precision)


def processed(worker: WorkerProcess) -> int:
    """How many series the worker analysed (a re-published, finished series is re-read, not counted)."""
    return worker.log_text().count("processing ")


def test_a_research_task_carries_the_outputs_a_local_analyze_writes(tmp_path: Path, ct: Path) -> None:
    files = sorted((ct / "fatty").iterdir())
    models = ModelCache(PhantomLiverBackend)
    run = local_run(tmp_path / "local")
    carried = ResearchOptions.from_json(research_settings(run)["research"])
    assert carried == ResearchOptions(write_preview=True), "the CLI's run: preview.png and the DICOM outputs"
    analyze_series_files(FATTY, files, tmp_path / "research", tmp_path, NodeConfig(), models, carried)
    assert {"result.json", "preview.png", "seg.dcm"} <= {p.name for p in (tmp_path / "research" / FATTY).iterdir()}

    no_dicom = replace(run, options=replace(run.options, write_dicom=False, save_mask=True))
    carried = ResearchOptions.from_json(research_settings(no_dicom)["research"])
    result = analyze_series_files(FATTY, files, tmp_path / "no-dicom", tmp_path, NodeConfig(), models, carried)
    assert result.outputs == () and {p.name for p in (tmp_path / "no-dicom" / FATTY).iterdir()} == {
        "result.json", "preview.png", "liver_mask.nii.gz"}  # fmt: skip

    analyze_series_files(FATTY, files, tmp_path / "node", tmp_path, NodeConfig(), models)  # a node's task: as before
    assert "preview.png" not in {p.name for p in (tmp_path / "node" / FATTY).iterdir()}


def test_two_series_rows_are_the_workers_and_a_rerun_publishes_nothing(tmp_path: Path, broker: RabbitMQ, ct: Path,
                                                                        fleet: WorkerProcess) -> None:  # fmt: skip
    fleet.start()
    out = tmp_path / "out"
    done = analyze(broker, ct, out)
    assert done.returncode == 0, done.stderr
    assert "2 series published to amqp://liverfat:***@127.0.0.1" in done.stderr
    table = rows(out)
    assert (table[FATTY]["status"], table[FATTY]["grade"]) == ("processed", "moderate-to-severe")
    assert (table[NORMAL]["status"], table[NORMAL]["grade"]) == ("processed", "none-or-mild")
    assert abs(float(table[FATTY]["graded_hu"]) - 34.0) < 2.0
    assert {row["model"] for row in table.values()} == {PhantomLiverBackend().info.name}, "the worker's model"
    worker_name = fleet.log_text().split("fleet worker ")[1].split(":")[0]
    assert f"{FATTY}: processed, moderate-to-severe graded on" in done.stdout and f"[{worker_name}]" in done.stdout
    for uid in (FATTY, NORMAL):
        assert {"result.json", "preview.png", "seg.dcm"} <= {p.name for p in (out / uid).iterdir()}

    local = tmp_path / "local"  # the same inputs analysed here: the same rows, fingerprints included
    analyze_inputs([ct], local_run(local), PhantomLiverBackend)
    ignored = {"analysed_at"}
    assert {folder: {k: v for k, v in row.items() if k not in ignored} for folder, row in rows(local).items()} == {
        folder: {k: v for k, v in row.items() if k not in ignored} for folder, row in table.items()}  # fmt: skip

    again = analyze(broker, ct, out)
    assert again.returncode == 0, again.stderr
    assert "published" not in again.stderr and again.stdout.count(": up to date (processed") == 2
    assert processed(fleet) == 2 and "already done" not in fleet.log_text(), "nothing was published again"
    kept = analyze_inputs([ct], local_run(out), no_model).cases  # a local re-run keeps the fleet's rows too
    assert [case.report for case in kept] == [None, None] and rows(out) == table


def test_an_interrupted_collector_rerun_records_what_finished_meanwhile(tmp_path: Path, broker: RabbitMQ, ct: Path,
                                                                          fleet: WorkerProcess) -> None:  # fmt: skip
    out = tmp_path / "out"
    log = tmp_path / "collector.log"
    with log.open("w") as stderr:
        collector = subprocess.Popen(analyze_command(ct, out), env=collector_env(broker), stdout=subprocess.DEVNULL,
                                     stderr=stderr)  # fmt: skip
    try:
        wait_for(lambda: "2 series published" in log.read_text(), 60, "the collector to publish")
    finally:
        collector.send_signal(signal.SIGKILL)
        collector.wait()
    assert not (out / "results.csv").exists(), "no worker yet: nothing collected"

    fleet.start()  # the workers finish while no collector runs: the completions wait in the out dir's queue
    client = BrokerClient(celery_app(QueueSection(broker=broker.url)))
    try:
        wait_for(lambda: client.depth(research_reply_queue(out)).ready == 2, COLLECT_S, "both completions")
    finally:
        client.close()

    done = analyze(broker, ct, out)
    assert done.returncode == 0, done.stderr
    assert "published" not in done.stderr, "the finished series were recorded, not published again"
    assert {row["status"] for row in rows(out).values()} == {"processed"} and set(rows(out)) == {FATTY, NORMAL}
    assert processed(fleet) == 2 and "already done" not in fleet.log_text()


def test_a_dead_lettered_series_is_a_failed_row_with_the_reason(tmp_path: Path, broker: RabbitMQ, ct: Path,
                                                                 fleet: WorkerProcess) -> None:  # fmt: skip
    fleet.start(kill_series=FATTY)  # the fatty series kills its worker child every time
    out = tmp_path / "out"
    done = analyze(broker, ct, out)
    assert done.returncode == 1, "a failed series: exit 1, as a local run"
    assert "1 of 2 series failed" in done.stderr
    table = rows(out)
    assert (table[FATTY]["status"], table[FATTY]["reasons"], table[FATTY]["grade"]) == (
        "failed", Reason.DEAD_LETTERED.value, "not-graded")  # fmt: skip
    assert f"{FATTY}: failed, not-graded ({Reason.DEAD_LETTERED.value}) [dead-lettered]" in done.stdout
    [finding] = json.loads((out / FATTY / "result.json").read_text())["reasons"]
    assert "stopped its worker" in finding["message"] and "not retried" in finding["message"]
    assert (table[NORMAL]["status"], table[NORMAL]["grade"]) == ("processed", "none-or-mild")

    fleet.stop()  # a re-run publishes the failed series again (a failed row is never current); no worker takes it
    client = BrokerClient(celery_app(QueueSection(broker=broker.url)))
    rerun = subprocess.Popen(analyze_command(ct, out), env=collector_env(broker), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: client.depth(SERIES_QUEUE).ready == 1, 60, "the failed series to be published again")
        assert not (out / FATTY).exists(), "its failed result is removed before the series is published again"
        assert rows(out)[NORMAL]["status"] == "processed"
        rerun.send_signal(signal.SIGINT)  # Ctrl-C: the series stays in the fleet, a later run records it
        _, stderr = rerun.communicate(timeout=60)
        assert rerun.returncode == 130 and "stopped with 1 series in the fleet" in stderr
    finally:
        rerun.kill()
        for task in client.fetch(SERIES_QUEUE):  # leave the broker's queues empty for the next test
            task.ack()
        client.close()


def test_the_collector_waits_out_a_broker_restart(tmp_path: Path, broker: RabbitMQ, ct: Path,
                                                   fleet: WorkerProcess) -> None:  # fmt: skip
    fleet.start(delay_s=4.0)  # each series takes a while: the restart comes while they are in the fleet
    out = tmp_path / "out"
    log = tmp_path / "collector.log"
    with log.open("w") as stderr:
        collector = subprocess.Popen(analyze_command(ct, out), env=collector_env(broker), stdout=subprocess.PIPE,
                                     stderr=stderr, text=True)  # fmt: skip
    try:
        wait_for(lambda: "2 series published" in log.read_text(), 60, "the collector to publish")
        broker.stop()
        wait_for(lambda: "unavailable" in log.read_text(), 60, "the collector to notice")
        broker.start()
        stdout, _ = collector.communicate(timeout=COLLECT_S)
    finally:
        collector.kill()
    assert collector.returncode == 0, log.read_text()
    assert broker.password not in stdout + log.read_text()
    assert {row["status"] for row in rows(out).values()} == {"processed"} and set(rows(out)) == {FATTY, NORMAL}
    assert stdout.count(": processed, ") == 2


def test_a_nifti_file_is_analysed_here_and_nothing_is_published(tmp_path: Path, broker: RabbitMQ) -> None:
    ct, _ = render_volume(Phantom().with_liver_hu(34.0), Grid(rows=64, columns=64, pixel_spacing_mm=5.0))
    sitk.WriteImage(ct.to_sitk(), str(tmp_path / "ct.nii.gz"))
    client = BrokerClient(celery_app(QueueSection(broker=broker.url)))
    try:
        fleet = FleetRun(plan_run([tmp_path / "ct.nii.gz"], local_run(tmp_path / "out")), client)
        assert fleet.publish() == 0
        [case] = fleet.collect(ModelCache(PhantomLiverBackend)).cases
        assert case.report is not None and case.analysed_by is None, "analysed in this process"
        assert (case.status, case.row["grade"]) == ("processed", "moderate-to-severe")
        assert client.depth(SERIES_QUEUE).ready == 0
    finally:
        client.close()
