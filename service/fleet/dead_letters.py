"""Dead letters: tasks the broker gave up on, turned into failed completions for their publishers.

The ``liverfat.series`` policy (``deploy/rabbitmq/definitions.json``) moves a task to
``liverfat.dead`` when its delivery limit runs out: a worker child died with it every time
(the series crashes or exhausts the worker), so it is not retried. A task that raised instead of
returning (a bug: the worker records every analysis failure as a failed outcome) is rejected
there too. Whoever reads ``liverfat.dead`` -- the node's dispatcher, the research collector --
calls :func:`forward_dead_letters`: each dead letter becomes a FAILED :class:`~.messages.Completion`
with reason ``dead_lettered`` in the task's own ``reply_to`` queue, then leaves ``liverfat.dead``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from liverfat.errors import Finding, Reason
from liverfat.service.fleet.broker import BrokerClient, Delivery
from liverfat.service.fleet.messages import DEAD_QUEUE, Completion, SeriesTask
from liverfat.service.spool_types import JobResult, JobState

log = logging.getLogger(__name__)

DELIVERY_LIMIT = "delivery_limit"  # RabbitMQ's x-death reason for a quorum queue's delivery limit
DELIVERY_LIMIT_MESSAGE = ("the series stopped its worker each time it was delivered, until the broker's delivery "
                          "limit ran out (policy on liverfat.series); not retried")  # fmt: skip


def why_dead(headers: Mapping[str, Any]) -> str:
    """What an administrator reads: why the broker dead-lettered the task (from its ``x-death`` header).

    The dead letter does not say how often it was delivered (RabbitMQ resets ``x-delivery-count``):
    that is the ``delivery-limit`` of the ``liverfat.series`` policy, plus the first delivery.
    """
    deaths = headers.get("x-death") or [{}]
    reason = str(deaths[0].get("reason", "unknown"))
    if reason == DELIVERY_LIMIT:
        return DELIVERY_LIMIT_MESSAGE
    return f"the worker could not process the series (dead-lettered by the broker: {reason}); not retried"


def dead_letter_completion(delivery: Delivery) -> tuple[str, Completion]:
    """The reply queue and FAILED completion of a dead-lettered Celery task message; ``ValueError`` if unreadable."""
    try:
        args, _kwargs, _embed = delivery.body
        task = SeriesTask.from_json(args[0])
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"not a liverfat task message: {type(error).__name__}: {error}") from error
    why = why_dead(delivery.headers)
    result = JobResult(JobState.FAILED, reasons=(Finding(Reason.DEAD_LETTERED, why).to_json(),), error=why)
    return task.reply_to, Completion.of(task, result, worker=None)


def forward_dead_letters(client: BrokerClient, limit: int = 100) -> list[Completion]:
    """Publish a failed completion for each waiting dead letter, then acknowledge it; the completions sent.

    Raises ``BrokerUnavailable`` (from the client) when the broker goes away; a dead letter not
    yet acknowledged stays in ``liverfat.dead`` and is forwarded next time (the consumer ignores
    a completion it already recorded).
    """
    sent = []
    for delivery in client.fetch(DEAD_QUEUE, limit):
        try:
            reply_to, completion = dead_letter_completion(delivery)
        except ValueError as error:
            log.error("dropping a message in %s that is no liverfat task: %s", DEAD_QUEUE, error)
            delivery.ack()
            continue
        client.publish_completion(reply_to, completion)
        delivery.ack()
        log.warning("task %s (series %s): %s", completion.task_id, delivery.body[0][0].get("series_uid"),
                    completion.result.error)  # fmt: skip
        sent.append(completion)
    return sent
