"""The local worker pool: how workers are planned (pure), pinned (a real process) and run (a real node).

The node tests run ``Node`` in this process with real worker processes; the phantom backend is
the only fake, made slow so that both workers are seen busy at once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from liverfat.errors import LiverfatError, Reason
from liverfat.service import sender as sender_module
from liverfat.service.config import NodeConfig, WorkerSection, load_config
from liverfat.service.node import Node
from liverfat.service.spool import InstanceInfo, Job, JobState, Spool
from liverfat.service.worker_pool import WorkerSlot, plan_workers, usable_cores, visible_gpus
from tests.service.conftest import free_port, phantom_series
from tests.service.fake_backend import PhantomLiverBackend
from tests.service.node_process import toml, wait_for
from tests.service.test_sender import Receiver

# -- planning ------------------------------------------------------------------------------


def test_auto_without_a_gpu_runs_count_cpu_workers_and_one_alone_keeps_torch_defaults() -> None:
    [alone] = plan_workers(WorkerSection(), gpus=(), cores=2)
    assert alone == WorkerSlot("worker-0", "cpu", cuda_visible_devices=None, threads=None, model_device=None)
    pair = plan_workers(WorkerSection(count=2), gpus=(), cores=16)
    assert [(s.name, s.device, s.threads, s.model_device) for s in pair] == [("worker-0", "cpu", 8, None),
                                                                             ("worker-1", "cpu", 8, None)]  # fmt: skip


def test_cpu_workers_split_the_cores_with_at_least_one_thread_each_and_ignore_the_gpus() -> None:
    slots = plan_workers(WorkerSection(count=3, devices="cpu"), gpus=("0", "1"), cores=2)
    assert [(s.device, s.cuda_visible_devices, s.threads, s.model_device) for s in slots] == [("cpu", None, 1, "cpu")] * 3


def test_auto_with_gpus_pins_one_worker_to_each_and_its_model_to_cuda_0() -> None:
    slots = plan_workers(WorkerSection(count=5), gpus=("2", "3"), cores=16)  # CUDA_VISIBLE_DEVICES=2,3 in the node
    assert [(s.name, s.device, s.cuda_visible_devices, s.threads, s.model_device) for s in slots] == [
        ("worker-0", "cuda:0", "2", 8, "cuda:0"), ("worker-1", "cuda:1", "3", 8, "cuda:0")]  # fmt: skip
    [one] = plan_workers(WorkerSection(), gpus=("GPU-5b1e",), cores=16)
    assert (one.cuda_visible_devices, one.threads) == ("GPU-5b1e", None)


def test_listed_gpus_are_indices_into_the_visible_ones() -> None:
    slots = plan_workers(WorkerSection(devices=(1, 0)), gpus=("4", "6"), cores=4)
    assert [(s.device, s.cuda_visible_devices, s.threads) for s in slots] == [("cuda:1", "6", 2), ("cuda:0", "4", 2)]
    undetected = plan_workers(WorkerSection(devices=(0, 1)), gpus=(), cores=4)  # no driver seen: passed on as is
    assert [s.cuda_visible_devices for s in undetected] == ["0", "1"]
    with pytest.raises(LiverfatError, match="lists GPU 2, but this host has 2 visible GPU") as raised:
        plan_workers(WorkerSection(devices=(0, 2)), gpus=("0", "1"), cores=4)
    assert raised.value.reason is Reason.CONFIG_INVALID


def test_gpus_are_counted_from_cuda_visible_devices_else_from_the_driver(tmp_path: Path) -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1, 0,-1,2"}) == ("1", "0"), "CUDA stops at an invalid entry"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == ()
    driver = tmp_path / "gpus"
    for pci in ("0000:17:00.0", "0000:65:00.0"):
        (driver / pci).mkdir(parents=True)
    assert visible_gpus({}, proc=driver) == ("0", "1")
    assert visible_gpus({}, proc=tmp_path / "no-driver") == ()
    assert usable_cores() == len(os.sched_getaffinity(0)) >= 1


def _pinned(slot: WorkerSlot, answer: Any) -> None:
    slot.pin()
    import torch

    answer.put((os.environ.get("CUDA_VISIBLE_DEVICES"), torch.get_num_threads()))


def test_pin_sets_the_gpu_and_the_threads_in_the_worker_process_only() -> None:
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    process = context.Process(target=_pinned, args=(WorkerSlot("worker-1", "cuda:1", "7", 1, "cuda:0"), answer))
    process.start()
    assert answer.get(timeout=120) == ("7", 1)
    process.join(30)
    assert process.exitcode == 0 and os.environ.get("CUDA_VISIBLE_DEVICES") != "7"


# -- a node with two workers ---------------------------------------------------------------

DELAY_S = 5.0  # each prediction: long enough to see both workers busy at once on a loaded machine


@pytest.fixture
def pool_node(tmp_path: Path) -> Iterator[Node]:
    path = tmp_path / "liverfat.toml"
    path.write_text(toml({
        "node": {"host": "127.0.0.1", "port": free_port()},
        "spool": {"dir": str(tmp_path / "spool"), "min_free_disk_mb": 0, "nearly_full_margin_mb": 0},
        "worker": {"count": 2, "devices": "cpu"},
        "http": {"host": "127.0.0.1", "port": free_port()},
    }))  # fmt: skip
    node = Node(load_config(path, environ={}), load_model=PhantomLiverBackend.loader(DELAY_S))
    node.start()
    yield node
    node.stop()


def store_series(config: NodeConfig, folder: Path) -> str:
    """A phantom series put into the spool as the listener would, complete at once; its UID."""
    spool = Spool(config.spool.dir)
    try:
        for path in phantom_series(folder):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            spool.store_instance(path.read_bytes(), InstanceInfo(ds.SOPInstanceUID, ds.SOPClassUID,
                                                                 ds.SeriesInstanceUID, ds.StudyInstanceUID, "SCU"))
        spool.complete_stable(0.0)
    finally:
        spool.close()
    return str(ds.SeriesInstanceUID)


def jobs(node: Node) -> dict[str, Job]:
    """The newest version of each series, read after a tick of the node."""
    node.tick()
    assert node.spool is not None
    return {job.series_uid: job for job in node.spool.jobs()}


def jobs_when(node: Node, ready: Callable[[dict[str, Job]], bool], timeout: float, what: str) -> dict[str, Job]:
    """The series' jobs once ``ready`` says so, ticking the node meanwhile."""

    def check() -> dict[str, Job] | None:
        found = jobs(node)
        return found if ready(found) else None

    found: dict[str, Job] = wait_for(check, timeout, what, interval=0.05)
    return found


def all_in(state: JobState) -> Callable[[dict[str, Job]], bool]:
    return lambda found: len(found) == 2 and all(job.state is state for job in found.values())


def jobs_reported(node: Node) -> int:
    """Series done as the workers' reports say, read after a tick of the node (the reports' one reader)."""
    node.tick()
    return sum(w.jobs_done for w in node.status().workers or ())


def models_loaded(node: Node) -> bool:
    node.tick()
    return all(w.model is not None and w.model.loaded for w in node.status().workers or ())


def both_busy(node: Node, tmp_path: Path) -> dict[str, Job]:
    wait_for(lambda: models_loaded(node), 120, "both workers to load their model", interval=0.2)
    for name in ("a", "b"):
        store_series(node.config, tmp_path / name)
    return jobs_when(node, all_in(JobState.PROCESSING), 60, "both series processed at once")


def get(node: Node, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.config.http.port}{path}", timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.slow
def test_two_workers_process_two_series_at_once_and_every_view_shows_both(pool_node: Node, tmp_path: Path) -> None:
    busy = both_busy(pool_node, tmp_path)
    assert {job.claimed_by for job in busy.values()} == {"worker-0", "worker-1"}
    done = jobs_when(pool_node, all_in(JobState.DONE), 90, "both series done")
    assert {(job.claimed_by, job.attempts) for job in done.values()} == {("worker-0", 1), ("worker-1", 1)}
    wait_for(lambda: jobs_reported(pool_node) == 2, 10, "both reports")

    health = json.loads(get(pool_node, "/healthz"))
    assert health["status"] == "ok" and health["worker_up"] is True
    assert [(w["name"], w["device"], w["up"], w["jobs_done"], w["restarts"]) for w in health["workers"]] == [
        ("worker-0", "cpu", True, 1, 0), ("worker-1", "cpu", True, 1, 0)]  # fmt: skip
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(get(pool_node, "/metrics")) for s in f.samples}  # fmt: skip
    host = health["workers"][0]["host"]
    for name in ("worker-0", "worker-1"):
        labels = (("device", "cpu"), ("host", host), ("worker", name))
        assert found[("liverfat_worker_up", labels)] == 1 and found[("liverfat_worker_jobs_done_total", labels)] == 1
        assert found[("liverfat_worker_last_seen_seconds", labels)] < 5
    assert found[("liverfat_workers", (("state", "up"),))] == 2 and found[("liverfat_workers", (("state", "down"),))] == 0
    assert not any(name.startswith("liverfat_queue_") for name, _ in found), "no broker queue in local mode"
    page = get(pool_node, "/")
    assert "<h2>Workers</h2>" in page and "worker-1" in page and page.count('<span class="ok">up</span>') == 2


@pytest.mark.slow
def test_a_worker_killed_mid_series_gives_back_only_its_series_while_the_other_goes_on(
    pool_node: Node, tmp_path: Path
) -> None:
    busy = both_busy(pool_node, tmp_path)
    victim, survivor = sorted(busy.values(), key=lambda job: str(job.claimed_by))
    [process] = [p for p in multiprocessing.active_children() if p.name == f"liverfat-{victim.claimed_by}"]
    assert process.pid is not None
    os.kill(process.pid, signal.SIGKILL)
    requeued = jobs_when(pool_node, lambda found: found[victim.series_uid].state is not JobState.PROCESSING
                         or found[victim.series_uid].attempts > 1, 30, "the victim's series back in the queue")  # fmt: skip
    other = requeued[survivor.series_uid]
    assert (other.state, other.attempts, other.claimed_by) == (JobState.PROCESSING, 1, survivor.claimed_by)
    done = jobs_when(pool_node, all_in(JobState.DONE), 120, "both series done")
    assert (done[survivor.series_uid].attempts, done[survivor.series_uid].claimed_by) == (1, survivor.claimed_by)
    assert done[victim.series_uid].attempts == 2
    workers = {w.name: w for w in pool_node.status().workers or ()}
    assert (workers[str(victim.claimed_by)].restarts, workers[str(survivor.claimed_by)].restarts) == (1, 0)
    assert all(w.up for w in workers.values())


def test_workers_that_a_group_sigterm_stopped_first_are_no_death_when_the_node_stops(
    pool_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    """`kill -TERM -PGID` or `timeout` signal the whole process group: idle workers exit 0 before the node stops."""
    wait_for(lambda: models_loaded(pool_node), 120, "both workers to load their model", interval=0.2)
    workers = [p for p in multiprocessing.active_children() if p.name.startswith("liverfat-worker-")]
    assert len(workers) == 2
    for process in workers:
        assert process.pid is not None
        os.kill(process.pid, signal.SIGTERM)
    for process in workers:
        process.join(30)
        assert process.exitcode == 0
    with caplog.at_level("INFO", logger="liverfat.service.worker_pool"):
        pool_node.stop()
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "died" in m], messages
    assert len([m for m in messages if m.endswith(") stopped")]) == 2, messages


def test_a_worker_rings_the_sender_once_the_results_are_queued(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results leave when the worker has recorded them, not at the sender's next poll (made 60 s here)."""
    monkeypatch.setattr(sender_module, "POLL_S", 60.0)
    path = tmp_path / "liverfat.toml"
    path.write_text(toml({
        "node": {"host": "127.0.0.1", "port": free_port()},
        "spool": {"dir": str(tmp_path / "spool"), "min_free_disk_mb": 0, "nearly_full_margin_mb": 0},
        "send": {"destinations": [f"PACS@127.0.0.1:{receiver.port}"]},
        "http": {"port": 0},
    }))  # fmt: skip
    node = Node(load_config(path, environ={}), load_model=PhantomLiverBackend.loader(0.0))
    node.start()
    try:
        store_series(node.config, tmp_path / "series")
        wait_for(lambda: node.tick() or len(receiver.stored) >= 3, 30, "the results at the destination", interval=0.1)
    finally:
        node.stop()
