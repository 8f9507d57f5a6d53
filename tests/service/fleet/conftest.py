"""One real RabbitMQ per test module (starting one takes about 6 s); tests leave its queues empty."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.broker import RabbitMQ, rabbitmq_server


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    with rabbitmq_server(tmp_path_factory.mktemp("rabbitmq")) as server:
        yield server
