"""``liverfat analyze --broker``: a research run whose DICOM series the fleet's workers analyse.

The run is planned exactly as a local ``analyze`` plans it (``research.plan_run``: the same
discovery, the same ``results.csv`` and the same rule for what is current), so a case done by
an earlier run, local or fleet, is skipped. Every other DICOM series becomes one
``liverfat.analyze_series`` task (kind ``research``) whose outputs go to ``--out/<case>/``
on storage the workers share; its completion comes back on the output folder's own durable
reply queue (``liverfat.research.<8 hex>``), and the collector writes the case's row from the
``result.json`` the worker wrote, as a local run would have, durably, before it acknowledges
the completion. Dead letters (``liverfat.dead``) are turned into failed completions on the way.

A task's id is derived from the output folder, the series UID and a version made of the case's
input and settings fingerprints: completions left in the reply queue by an interrupted run are
recorded by the next run when the case is unchanged, and ignored when it changed. NIfTI files
are analysed here (workers read DICOM series only).

Usage (``service/cli.py``)::

    fleet = FleetRun(plan_run(inputs, run), BrokerClient(celery_app(queue)), listener)
    published = fleet.publish()   # current cases reported, earlier completions recorded, the rest published
    result = fleet.collect(models)  # NIfTI here, then every fleet completion recorded as it arrives
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from amqp.exceptions import AMQPError
from kombu.exceptions import OperationalError

from liverfat import __version__
from liverfat.analysis import ModelCache, Outcome, not_analysed, write_json_atomically
from liverfat.dicom_io.series import SeriesFiles
from liverfat.errors import Finding, Reason
from liverfat.service.config import NodeConfig
from liverfat.service.fleet.broker import BrokerClient, BrokerUnavailable, Delivery
from liverfat.service.fleet.dead_letters import forward_dead_letters
from liverfat.service.fleet.messages import Completion, SeriesTask, publisher_settings, research_reply_queue
from liverfat.service.fleet.staging import remove_staging
from liverfat.service.research import Case, CaseOutcome, ResearchRun, RunListener, RunPlan, RunResult, result_row
from liverfat.service.series_job import ResearchOptions

log = logging.getLogger(__name__)

POLL_S = 0.5  # between looks at the reply queue while nothing arrives
FETCH = 100  # completions taken from the reply queue at a time (their rows written at once)
RECONNECT_S = (1.0, 30.0)  # the broker away while waiting: first delay, cap (doubling)
DEAD_LETTER = "dead-lettered"  # ``CaseOutcome.analysed_by`` of a series the broker gave up on
T = TypeVar("T")


def research_settings(run: ResearchRun) -> dict[str, dict[str, Any]]:
    """The settings a research task carries: the run's eligibility and analysis settings with a local
    ``analyze``'s site defaults (no ``[outputs]`` text, no "not applicable" SR), and its output options."""
    options = run.options
    config = NodeConfig(eligibility=options.policy, analysis=options.config, grading=options.config.grading)
    return {**publisher_settings(config), "research": ResearchOptions.of(options).to_json()}


def case_version(case: Case, settings: str) -> int:
    """A research case's "series version": its input and settings fingerprints and the software version, as a
    number, so that the task id changes whenever the outcome could."""
    return int(hashlib.sha256(f"{case.fingerprint}/{settings}/{__version__}".encode()).hexdigest()[:8], 16)


class FleetRun:
    """One ``analyze --broker`` run: publish the cases that are not current, then record each completion's row."""

    def __init__(self, plan: RunPlan, client: BrokerClient, listener: RunListener | None = None) -> None:
        self.plan = plan
        self.client = client
        self.listener = listener
        self.out_dir = plan.run.options.out_dir.absolute()
        self.reply_to = research_reply_queue(self.out_dir)
        self.settings = research_settings(plan.run)
        self.waiting: dict[str, Case] = {}  # task id -> case, until its completion is recorded
        self.local: list[Case] = []  # NIfTI files, analysed here
        self.outcomes: list[CaseOutcome] = []

    def publish(self) -> int:
        """Report the current cases, record completions an earlier run left, publish the rest; how many were published.

        The reply queue is declared first; a broker that cannot be reached now raises
        :class:`BrokerUnavailable` (the command exits 2), later it is waited for.
        """
        if self.listener is not None:
            self.listener.run_started(len(self.plan.cases))
        self.client.declare(self.reply_to)
        tasks: dict[str, SeriesTask] = {}
        for case in self.plan.cases:
            kept = self.plan.kept(case)
            if kept is not None:
                self._done(kept)
            elif isinstance(case.item, SeriesFiles):
                task = self._task(case, case.item)
                tasks[task.task_id] = task
                self.waiting[task.task_id] = case
            else:
                self.local.append(case)
        self._retrying(lambda: self._collect(accept=not self.plan.run.redo))  # --force: an earlier run's are not taken
        for task_id, case in self.waiting.items():
            if case.folder in self.plan.rows:  # a recorded result, outdated or failed: the worker must not re-read it
                shutil.rmtree(self.out_dir / case.folder, ignore_errors=True)
            self._retrying(partial(self.client.publish_task, tasks[task_id]))
        self._waiting_stage()
        return len(self.waiting)

    def collect(self, models: ModelCache) -> RunResult:
        """Analyse the NIfTI files here, then record fleet completions until every published case has one."""
        for case in self.local:
            if self.listener is not None:
                self.listener.case_started(len(self.outcomes) + 1, case)
            self._done(self.plan.analyse(case, models, self.listener))
        self._waiting_stage()
        while self.waiting:
            if not self._retrying(self._collect):
                time.sleep(POLL_S)
        return self.plan.finish(self.outcomes)

    def _task(self, case: Case, series: SeriesFiles) -> SeriesTask:
        return SeriesTask.create(kind="research", publisher=str(self.out_dir.resolve()),
                                 series_uid=series.series_uid, version=case_version(case, self.plan.settings),
                                 files=series.files, out_dir=self.out_dir, root=self.out_dir, reply_to=self.reply_to,
                                 settings=self.settings, case=case.folder)  # fmt: skip

    def _collect(self, accept: bool = True) -> int:
        """Forward dead letters, then record the completions waiting in the reply queue; how many arrived.

        Their rows go into results.csv in one durable write (at 100,000 rows a write takes about
        1.5 s: one per completion would not keep up with a large fleet), then they are acknowledged.
        """
        forward_dead_letters(self.client)
        deliveries = list(self.client.fetch(self.reply_to, FETCH))
        pairs = [self._awaited(delivery) for delivery in deliveries] if accept else []
        awaited = [pair for pair in pairs if pair is not None]
        recorded = [self._outcome(case, completion) for case, completion in awaited]
        if recorded:
            self.plan.record(*recorded)
            for outcome in recorded:
                self._done(outcome)
            self._waiting_stage()
        for _case, completion in awaited:  # what workers that died with the task (another host) left in --out
            remove_staging(self.out_dir, completion.task_id)
        for delivery in deliveries:
            with self._unavailable():
                delivery.ack()  # lost: the completion comes again and is ignored as a duplicate
        return len(deliveries)

    def _awaited(self, delivery: Delivery) -> tuple[Case, Completion] | None:
        """The case a completion is for, when this run waits for it (duplicates, outdated and unreadable ones not)."""
        try:
            completion = delivery.completion
        except (KeyError, TypeError, ValueError) as error:
            log.error("dropping a message in %s that is no completion: %s: %s", self.reply_to,
                      type(error).__name__, error)  # fmt: skip
            return None
        case = self.waiting.pop(completion.task_id, None)
        if case is None:
            log.info("completion of task %s (%s) ignored: already recorded, or its case changed since",
                     completion.task_id, completion.case)  # fmt: skip
            return None
        return case, completion

    def _outcome(self, case: Case, completion: Completion) -> CaseOutcome:
        """The case's row from the worker's ``result.json``; a dead letter's or a failure's from the completion."""
        result_json = self.out_dir / case.folder / "result.json"
        worker = completion.worker
        if worker is not None and result_json.is_file():
            result = json.loads(result_json.read_text())
        else:  # the broker gave up on it, or the worker failed before any analysis (e.g. the files unreadable there)
            result = self._failed_result(case, completion)
            write_json_atomically(result_json, result)
        return CaseOutcome(case, result_row(case, result, self.plan.settings), None,
                           worker.name if worker is not None else DEAD_LETTER)  # fmt: skip

    def _failed_result(self, case: Case, completion: Completion) -> dict[str, Any]:
        """``result.json`` of a series the fleet returned no analysis for: failed, with the completion's reasons."""
        series = case.item
        if not isinstance(series, SeriesFiles):
            raise TypeError(f"{case.folder} is no DICOM series: it was analysed here, not by the fleet")
        reasons = [Finding(Reason(r["code"]), r["message"]) for r in completion.result.reasons]
        study_uid = str(series.headers[0].get("StudyInstanceUID", "")) or None
        result = not_analysed(series.series_uid, study_uid, reasons, self.plan.run.options)
        return {**result.to_json(), "status": Outcome.FAILED.value, "error": completion.result.error}

    def _done(self, outcome: CaseOutcome) -> None:
        self.outcomes.append(outcome)
        if self.listener is not None:
            self.listener.case_done(len(self.outcomes), outcome)

    def _waiting_stage(self) -> None:
        if self.listener is not None and self.waiting:
            self.listener.stage(f"{len(self.waiting)} in the fleet")

    def _retrying(self, call: Callable[[], T]) -> T:
        """``call()`` until the broker answers: it may restart or be away for a while during a long run."""
        delay = RECONNECT_S[0]
        while True:
            try:
                return call()
            except BrokerUnavailable as error:
                log.warning("%s; trying again in %.0f s", error.message, delay)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_S[1])

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """A connection lost while acknowledging, as :class:`BrokerUnavailable` (the client reconnects)."""
        try:
            yield
        except (OSError, OperationalError, AMQPError) as error:
            self.client.close()
            raise BrokerUnavailable(self.client.url, error) from error
