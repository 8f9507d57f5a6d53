"""``liverfat config check``: every problem of a configuration at once, or the effective configuration.

``add_config_commands`` is called by ``liverfat.service.cli.build_parser``. The problems are
``load_config``'s (it collects all of them, each with its section and key); a valid
configuration is printed as TOML with the defaults filled in and the ``LIVERFAT_*`` variables
applied, which ``load_config`` reads back to the same configuration. Values of secret keys
(``[http] token``, any key naming a password or secret) are printed as ``REDACTED``, the
password in ``[queue] broker`` as ``***``; file paths
(a TLS private key's) are shown, their contents never read.
"""

from __future__ import annotations

import argparse
import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any

import tomli_w

from liverfat.service.config import Caller, Destination, NodeConfig, load_config
from liverfat.service.fleet.urls import redacted

REDACTED = "REDACTED"
SECRET_WORDS = ("token", "password", "secret")


def add_config_commands(subparsers: Any) -> None:
    """Add ``config check`` to the ``liverfat`` parser's subcommands."""
    config = subparsers.add_parser("config", help="check a configuration file")
    actions = config.add_subparsers(required=True, metavar="ACTION")
    check = actions.add_parser("check", help="list every problem (exit 2), or print the effective configuration")
    check.add_argument("--config", type=Path, help="TOML configuration file (default: embedded defaults); "
                       "LIVERFAT_<SECTION>_<KEY> variables override it")  # fmt: skip
    check.set_defaults(command=cmd_config_check)


def cmd_config_check(args: argparse.Namespace) -> int:
    """Problems raise ``LiverfatError(CONFIG_INVALID)``: ``liverfat`` prints them all and exits 2."""
    config = load_config(args.config)
    where = config.source or "the embedded defaults"
    print(f"# {where} is valid. Effective configuration: defaults, the file, then LIVERFAT_* variables; "
          f"secrets {REDACTED}.\n")  # fmt: skip
    print(tomli_w.dumps(effective_config(config)), end="")
    return 0


def effective_config(config: NodeConfig) -> dict[str, dict[str, Any]]:
    """Every section with every key, as TOML-ready values, secrets redacted; unset optional keys left out."""
    sections: dict[str, dict[str, Any]] = {}
    for field in dataclasses.fields(config):
        if field.name == "source":
            continue
        values = _plain(getattr(config, field.name))
        if field.name == "analysis":
            del values["grading"]  # it is the [grading] section
        sections[field.name] = values
    return sections


def _plain(value: Any, key: str = "") -> Any:
    """``value`` as TOML can write it: tables, lists, strings, numbers, booleans; ``None`` for unset."""
    if any(word in key for word in SECRET_WORDS) and value is not None:
        return REDACTED
    if key == "broker" and isinstance(value, str):
        return redacted(value)  # [queue] broker: the URL's password
    if isinstance(value, Destination | Caller | Path):
        return str(value)  # the forms load_config reads: "AE@host:port", "AE" or "AE@host", a path
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ((f.name, _plain(getattr(value, f.name), f.name)) for f in dataclasses.fields(value))
        return {name: item for name, item in items if item is not None}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, frozenset | set):
        return sorted(_plain(item) for item in value)
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value
