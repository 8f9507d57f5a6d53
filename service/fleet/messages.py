"""What travels through the broker: a series task, its completion, the queue names and task ids.

Everything is plain JSON (Celery is configured for JSON only). Paths inside a :class:`SeriesTask`
are the PUBLISHER's (a worker maps them with ``paths.PathMap``); paths inside a
:class:`Completion` are relative to the publisher's ``root``, so they mean the same on every host.

Usage (publisher)::

    task = SeriesTask.create(kind="node", publisher=config.node.ae_title, series_uid=job.series_uid,
                             version=job.version, files=files, out_dir=spool.results_dir / str(job.id),
                             root=spool.root, reply_to=node_reply_queue(config.node.ae_title),
                             settings=publisher_settings(config), job_id=job.id)
    publisher.publish(task)                    # service/fleet/broker.py
    for delivery in mailbox.fetch(task.reply_to):
        record(delivery.completion); delivery.ack()
"""

from __future__ import annotations

import hashlib
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from liverfat.service.config import NodeConfig
from liverfat.service.config_cli import effective_config
from liverfat.service.spool_types import JobResult, JobState, OutputFile

TASK_NAME = "liverfat.analyze_series"
SERIES_QUEUE = "liverfat.series"  # tasks; delivery limit and dead-lettering by policy (deploy/rabbitmq)
DEAD_QUEUE = "liverfat.dead"  # tasks whose delivery limit ran out
QUEUE_ARGUMENTS: Mapping[str, Any] = {"x-queue-type": "quorum"}  # every liverfat queue, as definitions.json says
LIVERFAT_NAMESPACE = uuid.UUID("5d8f3c1e-7a4b-5e2f-9c6d-0b1a2f3e4d5c")  # task ids: uuid5 in this namespace
JOB_RECORD = "job.json"  # the outcome a fleet worker leaves beside its outputs (re-read instead of analysing again)

Kind = Literal["node", "research"]
#: ``NodeConfig`` sections a task carries: the worker analyses with the publisher's settings, its own ``[model]``.
PUBLISHER_SECTIONS = ("eligibility", "analysis", "grading", "outputs")


def publisher_settings(config: NodeConfig) -> dict[str, dict[str, Any]]:
    """The settings a task carries: the publisher's analysis sections, ``ineligible_result`` and AE title."""
    effective = effective_config(config)
    return {**{name: effective[name] for name in PUBLISHER_SECTIONS},
            "worker": {"ineligible_result": config.worker.ineligible_result},
            "node": {"ae_title": config.node.ae_title}}  # fmt: skip


def node_reply_queue(ae_title: str) -> str:
    """The queue where a node's completions arrive: ``liverfat.done.<AE title>``."""
    return f"liverfat.done.{ae_title.strip()}"


def research_reply_queue(out_dir: Path) -> str:
    """The queue of one ``liverfat analyze --broker`` output folder: ``liverfat.research.<8 hex>``."""
    return f"liverfat.research.{hashlib.sha256(str(out_dir.resolve()).encode()).hexdigest()[:8]}"


def task_id(publisher: str, series_uid: str, version: int) -> str:
    """The task id of one series version: the same on every re-publish, so the work is done once."""
    return str(uuid.uuid5(LIVERFAT_NAMESPACE, f"{publisher}/{series_uid}/v{version}"))


@dataclass(frozen=True)
class SeriesTask:
    """One series version to analyse: the only argument of the ``liverfat.analyze_series`` task.

    ``files``, ``out_dir`` and ``root`` are absolute paths as the publisher sees them; outputs go
    to ``out_dir/<case folder>/`` and are reported relative to ``root`` (a node: its spool folder;
    research: the output folder, so ``root == out_dir``). ``settings`` are the publisher's
    effective sections (``PUBLISHER_SECTIONS`` plus ``worker.ineligible_result`` and
    ``node.ae_title``) as plain dicts, e.g. from ``config_cli.effective_config``.
    """

    task_id: str
    kind: Kind
    series_uid: str
    version: int
    files: tuple[str, ...]
    out_dir: str
    root: str
    reply_to: str
    settings: Mapping[str, Mapping[str, Any]]
    job_id: int | None = None  # kind "node": the spool's job
    case: str | None = None  # kind "research": the case's name in results.csv

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "kind": self.kind, "series_uid": self.series_uid, "version": self.version,
                "files": list(self.files), "out_dir": self.out_dir, "root": self.root, "reply_to": self.reply_to,
                "settings": {name: dict(values) for name, values in self.settings.items()}, "job_id": self.job_id,
                "case": self.case}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SeriesTask:
        if data.get("kind") not in ("node", "research"):
            raise ValueError(f"unknown task kind {data.get('kind')!r}")
        return cls(task_id=str(data["task_id"]), kind=data["kind"], series_uid=str(data["series_uid"]),
                   version=int(data["version"]), files=tuple(str(f) for f in data["files"]),
                   out_dir=str(data["out_dir"]), root=str(data["root"]), reply_to=str(data["reply_to"]),
                   settings=dict(data.get("settings") or {}), job_id=data.get("job_id"), case=data.get("case"))  # fmt: skip

    @classmethod
    def create(cls, *, kind: Kind, publisher: str, series_uid: str, version: int, files: Sequence[Path],
               out_dir: Path, root: Path, reply_to: str, settings: Mapping[str, Mapping[str, Any]],
               job_id: int | None = None, case: str | None = None) -> SeriesTask:  # fmt: skip
        """A task whose id is derived from ``publisher`` (node AE title or research out dir) and the version."""
        return cls(task_id(publisher, series_uid, version), kind, series_uid, version,
                   tuple(str(Path(f).absolute()) for f in files), str(out_dir.absolute()), str(root.absolute()),
                   reply_to, settings, job_id, case)  # fmt: skip


@dataclass(frozen=True)
class WorkerIdentity:
    """Who processed a task: the Celery worker's name, its host, the device its child is pinned to, the pid."""

    name: str
    host: str = field(default_factory=socket.gethostname)
    device: str = "cpu"
    pid: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "device": self.device, "pid": self.pid}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkerIdentity:
        return cls(str(data["name"]), str(data["host"]), str(data["device"]), int(data["pid"]))


@dataclass(frozen=True)
class Completion:
    """How a task ended, published to its ``reply_to`` queue; ``worker`` is ``None`` for a dead letter."""

    task_id: str
    kind: Kind
    result: JobResult
    job_id: int | None = None
    case: str | None = None
    worker: WorkerIdentity | None = None

    @classmethod
    def of(cls, task: SeriesTask, result: JobResult, worker: WorkerIdentity | None) -> Completion:
        return cls(task.task_id, task.kind, result, task.job_id, task.case, worker)

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "kind": self.kind, "job_id": self.job_id, "case": self.case,
                "result": job_result_to_json(self.result),
                "worker": None if self.worker is None else self.worker.to_json()}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Completion:
        worker = data.get("worker")
        return cls(str(data["task_id"]), data["kind"], job_result_from_json(data["result"]), data.get("job_id"),
                   data.get("case"), None if worker is None else WorkerIdentity.from_json(worker))  # fmt: skip


def job_result_to_json(result: JobResult) -> dict[str, Any]:
    """A :class:`JobResult` as JSON; output paths stay as they are (relative to the publisher's root)."""
    return {"state": result.state.value, "grade": result.grade, "parenchymal_hu": result.parenchymal_hu,
            "borderline": result.borderline, "reasons": [dict(r) for r in result.reasons],
            "timings": None if result.timings is None else dict(result.timings),
            "outputs": [o.to_json() for o in result.outputs], "error": result.error,
            "processing_s": result.processing_s}  # fmt: skip


def job_result_from_json(data: Mapping[str, Any]) -> JobResult:
    return JobResult(state=JobState(data["state"]), grade=data.get("grade"), parenchymal_hu=data.get("parenchymal_hu"),
                     borderline=data.get("borderline"), reasons=tuple(data.get("reasons") or ()),
                     timings=data.get("timings"), outputs=tuple(OutputFile(**o) for o in data.get("outputs") or ()),
                     error=data.get("error"), processing_s=data.get("processing_s"))  # fmt: skip
