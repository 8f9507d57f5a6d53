"""What ``liverfat analyze`` shows while it runs: progress on stderr, one summary line per case on stdout.

On a terminal, a tqdm bar over the cases (the total is known once discovery is done) whose
postfix names the stage of the case in hand (load, image checks, load model, resample,
segment, measure, write). Piped or redirected, there is no bar: a ``series i/N: source`` line
on stderr when a case starts, so a log shows what is being worked on. Either way each case
ends with its summary line on stdout.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from liverfat.analysis import Outcome
from liverfat.result import Grade
from liverfat.service.research import Case, CaseOutcome


class ConsoleProgress:
    """A ``research.RunListener`` that writes to the console; ``bar`` None picks one when stderr is a terminal."""

    def __init__(self, *, bar: bool | None = None, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._use_bar = self._err.isatty() if bar is None else bar
        self._bar: tqdm | None = None
        self._total = 0

    def run_started(self, total: int) -> None:
        self._total = total
        if self._use_bar and total:
            self._bar = tqdm(total=total, unit="series", file=self._err, dynamic_ncols=True)

    def case_started(self, index: int, case: Case) -> None:
        if self._bar is not None:
            self._bar.set_description(f"series {index}/{self._total}")
            self._bar.set_postfix_str(case.folder)
        else:
            print(f"series {index}/{self._total}: {case.source} ({case.folder})", file=self._err, flush=True)

    def stage(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(name)

    def note(self, text: str) -> None:
        """A line on stderr that leaves the bar intact (``analyze --broker``: what went to the fleet)."""
        if self._bar is not None:
            self._bar.write(text, file=self._err)
        else:
            print(text, file=self._err, flush=True)

    def case_done(self, index: int, outcome: CaseOutcome) -> None:
        line = f"series {index}/{self._total} {summary_line(outcome)}"
        if self._bar is not None:
            self._bar.write(line, file=self._out)
            self._bar.update(1)
            if index == self._total:
                self._bar.close()
        else:
            print(line, file=self._out, flush=True)


def summary_line(outcome: CaseOutcome) -> str:
    """``folder: status, grade value (why)``: the reasons' messages for a case analysed here, codes for a kept row
    or a fleet worker's (``[worker]`` at the end)."""
    report = outcome.report
    if report is None:
        row = outcome.row
        value = f" graded on {row['graded_hu']} HU" if row.get("graded_hu") else ""
        withheld = row.get("status") != Outcome.PROCESSED.value or row.get("grade") == Grade.NOT_GRADED.value
        why = f" ({row['reasons']})" if row.get("reasons") and withheld else ""
        facts = f"{row.get('status')}, {row.get('grade')}{value}{why}"
        if outcome.analysed_by is not None:  # a fleet worker's result, read from its result.json
            return f"{outcome.case.folder}: {facts} [{outcome.analysed_by}]"
        return f"{outcome.case.folder}: up to date ({facts})"
    result = report.result
    value = f" {result.value_text()}" if result.value_text() else ""
    withheld = report.outcome is not Outcome.PROCESSED or result.grade is Grade.NOT_GRADED
    why = "; ".join(f.message for f in result.reasons) if withheld else ""
    return f"{outcome.case.folder}: {report.outcome.value}, {result.grade.value}{value}" + (f" ({why})" if why else "")
