"""Who a fleet worker is, answered over Celery's remote control (``liverfat_identity``), not read from its name.

A worker's name (``[worker] name``) is whatever its administrator chose; the node's status
poller asks each worker it has not met (or that restarted) for its :class:`FleetIdentity`
instead. The command is registered when this module is imported (Celery's command registry is
per process); a worker answers it with what :func:`announce` put in its app's configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery
from celery.worker.control import inspect_command

IDENTITY_COMMAND = "liverfat_identity"
_CONF_KEY = "liverfat_identity"


@dataclass(frozen=True)
class FleetIdentity:
    """A fleet worker's host, the devices its children use, its main process and its model."""

    host: str
    devices: tuple[str, ...]  # one per child: "cpu", "cuda:0", ...
    pid: int
    version: str  # liverfat's
    model: str  # [model] name
    precision: str  # [model] precision

    @property
    def device(self) -> str:
        """The devices in one word, as the status shows them: ``"cpu"``, ``"cuda:0,1"``."""
        return device_summary(self.devices)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "devices": list(self.devices)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FleetIdentity:
        return cls(host=str(data["host"]), devices=tuple(str(d) for d in data["devices"]), pid=int(data["pid"]),
                   version=str(data["version"]), model=str(data["model"]), precision=str(data["precision"]))  # fmt: skip


def device_summary(devices: Sequence[str]) -> str:
    """``"cuda:0,1"`` for GPU children (in order, each once), ``"cpu"`` when none uses a GPU."""
    gpus = dict.fromkeys(d.removeprefix("cuda:") for d in devices if d.startswith("cuda:"))
    return "cuda:" + ",".join(gpus) if gpus else "cpu"


def announce(app: Celery, identity: FleetIdentity) -> None:
    """Make the workers of ``app`` in this process answer ``liverfat_identity`` with ``identity``."""
    app.conf[_CONF_KEY] = identity.to_json()


@inspect_command(name=IDENTITY_COMMAND)
def _answer(state: Any) -> dict[str, Any]:
    """The remote-control handler (run by the worker's main process)."""
    return dict(state.app.conf.get(_CONF_KEY) or {"error": "this worker announced no identity"})
