"""Group commit: items that arrive together from several threads are made durable by one batch.

A PACS that sends several series at once has one association thread per series, each waiting
for its instance to be fsynced and indexed before it may answer Success. Committed one by one,
every commit (an fsync of the index) waits for the one before it. Here the first thread to
arrive runs the batch for itself; threads that arrive while a batch is running queue, and the
next of them to run takes every queued item into one batch: one transaction for all of them.
Each thread returns only once the batch holding its item is committed (the spool then waits
for its file's fsyncs too), so a Success still means what it meant. With a single sender every batch is one item
and nothing waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Pending(Generic[Item, Result]):
    """One submitted item and, once its batch has run, its result or the batch's error."""

    def __init__(self, item: Item) -> None:
        self.item = item
        self.done = False
        self.result: Result | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """Runs ``run_batch`` over the items submitted while the previous batch was running.

    ``run_batch`` gets the items in arrival order and returns one result per item; when it
    raises, every item of that batch raises the same error (they shared one transaction).
    """

    def __init__(self, run_batch: Callable[[list[Item]], list[Result]]) -> None:
        self._run_batch = run_batch
        self._changed = threading.Condition()
        self._queued: list[_Pending[Item, Result]] = []
        self._running = False

    def submit(self, item: Item) -> Result:
        """Run ``item`` in the next batch and return its result once that batch is done."""
        pending: _Pending[Item, Result] = _Pending(item)
        with self._changed:
            self._queued.append(pending)
            while self._running and not pending.done:
                self._changed.wait()
            batch: list[_Pending[Item, Result]] = []
            if not pending.done:  # no batch running and ours not yet taken: run the queue ourselves
                batch, self._queued, self._running = self._queued, [], True
        if batch:
            self._run(batch)
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]  # set together with done

    def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        results: list[Result] = []
        error: BaseException | None = None
        try:
            results = self._run_batch([pending.item for pending in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
        except BaseException as failure:  # noqa: BLE001  # handed to every waiting thread, which raises it
            error = failure
        with self._changed:
            for index, pending in enumerate(batch):
                pending.error = error
                pending.result = None if error is not None else results[index]
                pending.done = True
            self._running = False
            self._changed.notify_all()
