#!/usr/bin/env python3
"""The fleet's RabbitMQ credentials: one user per role, each with a random password.

    sudo python3 deploy/fleet-secrets.py /etc/liverfat/fleet [--host rabbitmq] [--tls]

writes into the folder (made 0700; Python's standard library only, no liverfat install needed):

  node.env             LIVERFAT_QUEUE_BROKER for the node          (user liverfat-node)       0600
  worker.env           LIVERFAT_QUEUE_BROKER for every worker      (user liverfat-worker)     0600
  research.env         LIVERFAT_QUEUE_BROKER for `liverfat analyze --broker`  (liverfat-research)  0600
  rabbitmq-users.json  the three users as RabbitMQ definitions: name, salted SHA-256 password hash
                       (RabbitMQ's own scheme), permissions on the queues' virtual host    0644

deploy/compose-fleet.yml hands the .env files to its services and loads rabbitmq-users.json beside
deploy/rabbitmq/definitions.json (the file holds no password, so the broker's own user may read it).
Files already there are kept, so a second run changes nothing; remove the folder to draw new passwords
(and restart the broker: it loads the users at every start).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import quote

DEFINITIONS = Path(__file__).resolve().parent / "rabbitmq" / "definitions.json"
ROLES = ("node", "worker", "research")
SALT_BYTES = 4  # rabbit_password_hashing_sha256: 4 random bytes, then SHA-256(salt + password)


def password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + SHA-256(salt + UTF-8 password))."""
    salt = secrets.token_bytes(SALT_BYTES)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def queue_vhost(definitions: Path = DEFINITIONS) -> str:
    """The virtual host of the fleet's queues, as deploy/rabbitmq/definitions.json declares them."""
    vhosts = {queue["vhost"] for queue in json.loads(definitions.read_text())["queues"]}
    if len(vhosts) != 1:
        raise SystemExit(f"{definitions}: expected the queues in one virtual host, found {sorted(vhosts)}")
    return vhosts.pop()


def users_definitions(passwords: dict[str, str], vhost: str) -> dict[str, list[dict[str, object]]]:
    """RabbitMQ definitions for the users: each may configure, write and read in the fleet's virtual host.

    The virtual host is the boundary: the roles differ in their credentials (each revocable alone),
    not in what they may do there (Celery's control and event exchanges need the same rights for all).
    """
    users = [{"name": f"liverfat-{role}", "password_hash": password_hash(password),
              "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}
             for role, password in passwords.items()]  # fmt: skip
    permissions = [{"user": f"liverfat-{role}", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
                   for role in passwords]  # fmt: skip
    return {"users": users, "permissions": permissions}


def broker_url(role: str, password: str, host: str, port: int, tls: bool, vhost: str) -> str:
    scheme = "amqps" if tls else "amqp"
    return f"{scheme}://liverfat-{role}:{password}@{host}:{port}/{quote(vhost, safe='')}"


def write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (never readable by others in between)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.chmod(path, mode)  # the umask may have taken bits off


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write them (compose-fleet.yml: LIVERFAT_FLEET_SECRETS)")
    parser.add_argument("--host", default="rabbitmq", help="the broker's host name as the node and workers reach it")
    parser.add_argument("--tls", action="store_true", help="amqps:// (RabbitMQ's TLS listener) instead of amqp://")
    parser.add_argument("--port", type=int, help="default 5671 with --tls, else 5672")
    args = parser.parse_args(argv)
    files = [args.folder / f"{role}.env" for role in ROLES] + [args.folder / "rabbitmq-users.json"]
    present = [path for path in files if path.exists()]
    if present:
        print(f"kept: {', '.join(str(path) for path in present)} (remove the folder to draw new passwords)")
        if len(present) != len(files):
            raise SystemExit(f"{args.folder} holds only some of the files: remove it and run again")
        return 0
    args.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    vhost = queue_vhost()
    port = args.port or (5671 if args.tls else 5672)
    passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
    for role, password in passwords.items():
        url = broker_url(role, password, args.host, port, args.tls, vhost)
        write_new(args.folder / f"{role}.env", f"LIVERFAT_QUEUE_BROKER={url}\n", 0o600)
    write_new(args.folder / "rabbitmq-users.json", json.dumps(users_definitions(passwords, vhost), indent=2) + "\n",
              0o644)  # fmt: skip
    print(f"wrote {', '.join(path.name for path in files)} into {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
