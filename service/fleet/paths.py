"""Publisher paths as this host sees them: ``[queue] path_map`` on shared storage (NFS, CephFS).

The node and the workers share the spool (and research output folders). Mounted at the same
path everywhere, no mapping is needed (recommended); otherwise each worker's configuration says
``path_map = ["/srv/liverfat=/mnt/liverfat"]``: a publisher path under ``/srv/liverfat`` is read
and written under ``/mnt/liverfat`` on this host. The longest matching prefix wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import QueueSection


@dataclass(frozen=True)
class PathMap:
    """``(publisher prefix, local prefix)`` pairs, longest publisher prefix first; empty: identity."""

    pairs: tuple[tuple[PurePosixPath, PurePosixPath], ...] = ()

    @classmethod
    def from_config(cls, queue: QueueSection) -> PathMap:
        return cls.parse(queue.path_map)

    @classmethod
    def parse(cls, entries: tuple[str, ...] | list[str]) -> PathMap:
        """``"PUBLISHER_PREFIX=THIS_HOST_PREFIX"`` entries; both sides absolute."""
        pairs = []
        for entry in entries:
            remote, equals, local = entry.partition("=")
            if not equals or not remote.strip().startswith("/") or not local.strip().startswith("/"):
                raise LiverfatError(Reason.CONFIG_INVALID, f"[queue] path_map entries are written "
                                    f"/publisher/prefix=/this/host/prefix (absolute paths), got {entry!r}")  # fmt: skip
            pairs.append((PurePosixPath(remote.strip()), PurePosixPath(local.strip())))
        return cls(tuple(sorted(pairs, key=lambda pair: len(pair[0].parts), reverse=True)))

    def local(self, publisher_path: str) -> str:
        """The path on this host of a path the publisher named."""
        path = PurePosixPath(publisher_path)
        for remote, local in self.pairs:
            if path == remote or remote in path.parents:
                return str(local / path.relative_to(remote))
        return publisher_path
