"""Group commit: items that arrive while a batch runs go together into the next one, each gets its own answer."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import pytest

from liverfat.service.group_commit import GroupCommit

WAIT_S = 10.0


def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {WAIT_S:.0f} s for {what}")
        time.sleep(0.005)


class HeldFirstBatch:
    """A batch runner whose first batch waits until released, so that the next items queue behind it."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.first_running = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.first_running.set()
            assert self.release.wait(WAIT_S)
        if self.fail_on in items:
            raise sqlite3.OperationalError("disk I/O error")
        return [item * 10 for item in items]


def _submit_all(commit: GroupCommit[int, int], runner: HeldFirstBatch, later: list[int]) -> dict[int, object]:
    """Submit 0, and ``later`` while 0's batch runs; every item's result or error."""
    answers: dict[int, object] = {}

    def submit(item: int) -> None:
        try:
            answers[item] = commit.submit(item)
        except sqlite3.Error as error:
            answers[item] = error

    first = threading.Thread(target=submit, args=(0,))
    first.start()
    assert runner.first_running.wait(WAIT_S)
    threads = [threading.Thread(target=submit, args=(item,)) for item in later]
    for thread in threads:
        thread.start()
    _until(lambda: len(commit._queued) == len(later), "the later items to queue")
    runner.release.set()
    for thread in [first, *threads]:
        thread.join(WAIT_S)
    return answers


def test_items_that_arrive_during_a_batch_run_together_in_the_next_batch() -> None:
    runner = HeldFirstBatch()
    answers = _submit_all(GroupCommit(runner), runner, [1, 2, 3, 4])
    assert runner.batches[0] == [0]
    assert sorted(runner.batches[1]) == [1, 2, 3, 4] and len(runner.batches) == 2
    assert answers == {0: 0, 1: 10, 2: 20, 3: 30, 4: 40}


def test_a_failed_batch_fails_each_of_its_items_and_the_next_batch_runs() -> None:
    runner = HeldFirstBatch(fail_on=2)
    commit = GroupCommit(runner)
    answers = _submit_all(commit, runner, [1, 2, 3])
    assert answers[0] == 0
    assert all(isinstance(answers[item], sqlite3.OperationalError) for item in (1, 2, 3))
    assert commit.submit(5) == 50  # nothing left running or queued
    assert runner.batches[-1] == [5]


def test_a_lone_item_runs_at_once_as_its_own_batch() -> None:
    batches: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        batches.append(items)
        return [item.upper() for item in items]

    commit = GroupCommit(run)
    assert [commit.submit("a"), commit.submit("b")] == ["A", "B"]
    assert batches == [["a"], ["b"]]


def test_a_batch_that_answers_the_wrong_number_of_results_is_an_error() -> None:
    commit: GroupCommit[int, int] = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="a batch of 1 items gave 0 results"):
        commit.submit(1)
