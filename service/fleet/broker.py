"""Celery on RabbitMQ, configured once from ``[queue]``: the app, and a client for publishers and consumers.

Every durability setting of the fleet is here: quorum queues (``x-queue-type: quorum``, declared
by ``deploy/rabbitmq/definitions.json`` too, with the delivery-limit / dead-letter policy), late
acknowledgement (a task is acknowledged after its completion was published), a task whose worker
child died is rejected back to the queue (``task_reject_on_worker_lost``, counted by the broker's
delivery limit), one message per worker child at a time, publisher confirms, reconnecting
forever, JSON only, no result backend. ``amqps://`` URLs use TLS with ``[queue] ca_certificates``
(and ``certificate`` / ``private_key`` for client certificates).

Credentials never reach a log: print a broker URL only through :func:`redacted`.

Usage (the node's dispatcher, ``liverfat analyze --broker``; one :class:`BrokerClient` per thread)::

    client = BrokerClient(celery_app(config.queue))
    client.declare(reply_to)                 # the reply queue, before the first task names it
    client.publish_task(task)                # confirmed by the broker; BrokerUnavailable if down
    for delivery in client.fetch(reply_to):  # whatever is waiting, without blocking
        record(delivery.completion)          # the caller's own commit first ...
        delivery.ack()                       # ... then the broker forgets it
    client.depth(SERIES_QUEUE).ready         # passive declare: messages waiting
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from amqp.exceptions import AMQPError
from celery import Celery
from kombu import Connection, Producer, Queue
from kombu.exceptions import OperationalError
from kombu.message import Message

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import QueueSection
from liverfat.service.fleet.messages import QUEUE_ARGUMENTS, SERIES_QUEUE, TASK_NAME, Completion, SeriesTask
from liverfat.service.fleet.urls import redacted

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
IDLE_RECONNECT_S = 60.0  # a client connection unused this long is replaced before its next call
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


def liverfat_queue(name: str) -> Queue:
    """A durable quorum queue on the default exchange, as ``definitions.json`` declares liverfat's queues."""
    return Queue(name, routing_key=name, durable=True, auto_delete=False, queue_arguments=dict(QUEUE_ARGUMENTS))


def tls_options(queue: QueueSection) -> dict[str, Any] | None:
    """``broker_use_ssl`` for an ``amqps://`` broker (the broker's certificate and host name are checked)."""
    if queue.broker is None or urlsplit(queue.broker).scheme != "amqps":
        return None
    for name in ("ca_certificates", "certificate", "private_key"):
        path = getattr(queue, name)
        if path is not None and not path.is_file():
            raise LiverfatError(Reason.CONFIG_INVALID, f"[queue] {name}: no such file {path}")
    if (queue.certificate is None) != (queue.private_key is None):
        raise LiverfatError(Reason.CONFIG_INVALID, "[queue] certificate and private_key go together")
    options: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": urlsplit(queue.broker).hostname}
    if queue.ca_certificates is not None:
        options["ca_certs"] = str(queue.ca_certificates)
    if queue.certificate is not None and queue.private_key is not None:
        options |= {"certfile": str(queue.certificate), "keyfile": str(queue.private_key)}
    return options


def celery_app(queue: QueueSection) -> Celery:
    """The Celery app of the fleet (publisher and worker alike); ``[queue] broker`` must be set."""
    if not queue.broker:
        raise LiverfatError(Reason.CONFIG_INVALID, "[queue] broker is not set (amqp://user:password@host:5672//)")
    if urlsplit(queue.broker).scheme not in ("amqp", "amqps"):
        raise LiverfatError(Reason.CONFIG_INVALID, f"[queue] broker must be an amqp:// or amqps:// URL, "
                            f"got {redacted(queue.broker)}")  # fmt: skip
    app = Celery("liverfat", set_as_current=False)
    app.conf.update(
        broker_url=queue.broker,
        broker_use_ssl=tls_options(queue),
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,  # a worker started before the broker waits for it
        broker_connection_max_retries=None,  # ... and reconnects forever when it goes away
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        task_queues=[liverfat_queue(SERIES_QUEUE)],
        task_default_queue=SERIES_QUEUE,
        task_create_missing_queues=False,
        task_acks_late=True,  # acknowledged after the outputs and the completion exist
        task_reject_on_worker_lost=True,  # a child killed mid-series puts the message back (delivery limit counts)
        worker_prefetch_multiplier=1,  # a child takes one series; the next waits in the broker for any worker
        worker_cancel_long_running_tasks_on_connection_loss=False,  # finish it: the redelivery finds the result
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_publish_retry_policy=PUBLISH_RETRY,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        enable_utc=True,
    )
    return app


class BrokerUnavailable(LiverfatError):
    """The broker cannot be reached (or dropped the connection); the client reconnects on its next call."""

    def __init__(self, url: str, error: BaseException) -> None:
        super().__init__(Reason.BROKER_UNAVAILABLE, f"broker {redacted(url)} unavailable: {type(error).__name__}: "
                         f"{redacted(str(error))}")  # fmt: skip


@dataclass(frozen=True)
class QueueDepth:
    """A queue as a passive declare sees it: messages ready (not delivered), consumers attached."""

    ready: int
    consumers: int


@dataclass
class Delivery:
    """One message taken from a queue, unacknowledged until :meth:`ack` (after the caller's commit)."""

    message: Message

    @property
    def body(self) -> Any:
        return self.message.payload

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.message.headers or {}

    @property
    def completion(self) -> Completion:
        return Completion.from_json(self.body)

    def ack(self) -> None:
        self.message.ack()

    def reject(self) -> None:
        """Put the message back in its queue (for someone else, or for a later try)."""
        self.message.reject(requeue=True)


class BrokerClient:
    """One AMQP connection for publishing tasks and completions, reading queues and their depth.

    Not thread-safe (kombu connections are not): one per thread. Every method raises
    :class:`BrokerUnavailable` when the broker cannot be reached and reconnects on the next call.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.url: str = app.conf.broker_url
        self._connection: Connection | None = None
        self._declared: set[str] = set()
        self._used_at = 0.0

    @property
    def connected(self) -> bool:
        return self._connection is not None and bool(self._connection.connected)

    def publish_task(self, task: SeriesTask) -> None:
        """Send ``task`` to ``liverfat.series``, persistent, and wait for the broker's confirm."""
        with self._errors():
            producer = Producer(self._channel())
            self.app.send_task(TASK_NAME, args=[task.to_json()], task_id=task.task_id, queue=SERIES_QUEUE,
                               producer=producer, retry=False)  # fmt: skip

    def publish(self, queue: str, body: Mapping[str, Any]) -> None:
        """Publish ``body`` (JSON) to ``queue`` (declared first), persistent, confirmed by the broker."""
        with self._errors():
            channel = self._channel()
            self._declare(queue)
            Producer(channel).publish(dict(body), routing_key=queue, exchange="", serializer="json",
                                      delivery_mode=2, mandatory=False)  # fmt: skip

    def publish_completion(self, reply_to: str, completion: Completion) -> None:
        self.publish(reply_to, completion.to_json())

    def declare(self, queue: str) -> None:
        """Declare a durable quorum queue (a reply queue), so nothing published to it is dropped."""
        with self._errors():
            self._channel()
            self._declare(queue)

    def fetch(self, queue: str, limit: int = 100) -> Iterator[Delivery]:
        """The messages waiting in ``queue`` (at most ``limit``), one by one, each to be acked or rejected."""
        with self._errors():
            bound = liverfat_queue(queue).bind(self._channel())
            for _ in range(limit):
                message = bound.get(no_ack=False, accept=["json"])
                if message is None:
                    return
                yield Delivery(message)

    def depth(self, queue: str) -> QueueDepth:
        """``queue``'s ready messages and consumers (a passive declare: a missing queue raises)."""
        with self._errors():
            _name, ready, consumers = self._channel().queue_declare(queue=queue, passive=True)
            return QueueDepth(int(ready), int(consumers))

    def close(self) -> None:
        if self._connection is not None:
            self._connection.release()
        self._connection = None
        self._declared.clear()

    def _channel(self) -> Any:
        """The open channel; a connection idle for ``IDLE_RECONNECT_S`` is replaced first.

        The client's connection has no heartbeats (nothing would answer them between calls), so a
        connection that a broker or network failure killed while idle goes unnoticed until it is
        used; a fresh one costs milliseconds.
        """
        now = time.monotonic()
        if self._connection is not None and now - self._used_at > IDLE_RECONNECT_S:
            self.close()
        self._used_at = now
        if self._connection is None:
            self._connection = self.app.connection_for_write()
        if not self._connection.connected:
            self._connection.connect()
            self._declared.clear()
        return self._connection.default_channel

    def _declare(self, queue: str) -> None:
        if queue not in self._declared:
            liverfat_queue(queue).bind(self._connection.default_channel).declare()  # type: ignore[union-attr]
            self._declared.add(queue)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Connection and channel errors as :class:`BrokerUnavailable`, the connection dropped for a fresh one."""
        try:
            yield
        except LiverfatError:
            raise
        except (OSError, OperationalError, AMQPError) as error:
            self.close()
            raise BrokerUnavailable(self.url, error) from error
