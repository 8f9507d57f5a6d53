"""Where a fleet worker stages a task's outputs: a hidden folder INSIDE the task's ``out_dir``.

``out_dir / ".partial-<task id>-<host>-<pid>"``: the worker analyses into it, then renames the
series' folder from it to ``out_dir/<series>``, a rename within one folder, so within one file
system even when ``out_dir`` is a mount point (a research ``--out`` on NFS), and nothing appears
beside ``out_dir``. The host and pid tell which delivery a folder belongs to: a worker removes
the folders of its own host's dead children (:func:`remove_stale_staging`), and whoever records
a task's completion (the node's dispatcher, the research collector) removes every folder of
that task (:func:`remove_staging`), as a host that died leaves its folder behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PREFIX = ".partial-"


def staging_folder(out_dir: Path, task_id: str, host: str, pid: int) -> Path:
    """The staging folder of one delivery of ``task_id``: this host, this process."""
    return out_dir / f"{PREFIX}{task_id}-{host}-{pid}"


def remove_stale_staging(out_dir: Path, task_id: str, host: str) -> None:
    """The staging folders of ``task_id`` that processes of ``host`` left when they died (a killed child leaves one)."""
    prefix = f"{PREFIX}{task_id}-{host}-"
    for folder in out_dir.glob(f"{prefix}*"):
        pid = folder.name.removeprefix(prefix)
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def remove_staging(out_dir: Path, task_id: str) -> list[str]:
    """Remove every staging folder of ``task_id`` (its completion is recorded); the names of those removed.

    A delivery still running elsewhere loses its folder and ends with the recorded result
    (``worker.process_task`` returns the finished folder's record when its own rename fails).
    """
    removed = []
    for folder in sorted(out_dir.glob(f"{PREFIX}{task_id}-*")):
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
