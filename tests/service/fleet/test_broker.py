"""The fleet's broker client against a real RabbitMQ loaded with deploy/rabbitmq/definitions.json."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from liverfat.errors import Reason
from liverfat.service.cli import main
from liverfat.service.config import QueueSection
from liverfat.service.fleet.broker import BrokerClient, BrokerUnavailable, celery_app, redacted
from liverfat.service.fleet.messages import (
    SERIES_QUEUE,
    TASK_NAME,
    Completion,
    SeriesTask,
    WorkerIdentity,
    node_reply_queue,
    task_id,
)
from liverfat.service.spool_types import JobResult, JobState, OutputFile
from tests.broker import RabbitMQ, rabbitmq_server
from tests.service.test_scp import make_certificates


def a_task(reply_to: str, version: int = 1) -> SeriesTask:
    return SeriesTask.create(kind="node", publisher="NODE", series_uid="1.2.3", version=version,
                             files=[Path("/srv/spool/instances/a.dcm")], out_dir=Path("/srv/spool/results/7"),
                             root=Path("/srv/spool"), reply_to=reply_to, settings={"grading": {"threshold_hu": 40.0}},
                             job_id=7)  # fmt: skip


def test_redacted_hides_the_password_only() -> None:
    url = "amqps://node:s3cr3t@rabbit.example.org:5671/liverfat"
    assert redacted(url) == "amqps://node:***@rabbit.example.org:5671/liverfat"
    assert redacted("amqp://rabbit:5672//") == "amqp://rabbit:5672//"
    assert "s3cr3t" not in redacted("amqp://node:s3cr3t@[::1]:5672//")


def test_config_check_prints_the_broker_without_its_password(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("LIVERFAT_QUEUE_BROKER", "amqps://node:s3cr3t@rabbit.example.org:5671/liverfat")
    assert main(["config", "check"]) == 0
    printed = capsys.readouterr().out
    assert "s3cr3t" not in printed
    assert 'broker = "amqps://node:***@rabbit.example.org:5671/liverfat"' in printed


def test_task_ids_follow_the_series_version() -> None:
    assert task_id("NODE", "1.2.3", 1) == task_id("NODE", "1.2.3", 1)
    assert task_id("NODE", "1.2.3", 1) != task_id("NODE", "1.2.3", 2)
    assert task_id("NODE", "1.2.3", 1) != task_id("OTHER", "1.2.3", 1)
    assert SeriesTask.from_json(a_task("q").to_json()) == a_task("q")


def test_a_published_task_waits_in_the_quorum_queue_as_a_celery_message(broker: RabbitMQ) -> None:
    client = BrokerClient(celery_app(QueueSection(broker=broker.url)))
    task = a_task(node_reply_queue("NODE"))
    client.publish_task(task)
    assert client.depth(SERIES_QUEUE).ready == 1
    [delivery] = client.fetch(SERIES_QUEUE)
    args, _kwargs, _embed = delivery.body
    assert delivery.headers["id"] == task.task_id and delivery.headers["task"] == TASK_NAME
    assert SeriesTask.from_json(args[0]) == task
    delivery.ack()
    assert client.depth(SERIES_QUEUE).ready == 0
    client.close()


def test_a_completion_stays_queued_until_acknowledged(broker: RabbitMQ) -> None:
    reply_to = node_reply_queue("ACKTEST")
    completion = Completion.of(a_task(reply_to), JobResult(JobState.DONE, grade="normal", parenchymal_hu=55.0,
                               outputs=(OutputFile("results/7/1.2.3/seg.dcm", "1.2", "1.3", "1.4"),)),
                               WorkerIdentity("liverfat@host-cpu", "host", "cpu", 12))  # fmt: skip
    publisher = BrokerClient(celery_app(QueueSection(broker=broker.url)))
    publisher.publish_completion(reply_to, completion)
    consumer = BrokerClient(celery_app(QueueSection(broker=broker.url)))
    [unacked] = consumer.fetch(reply_to)
    assert unacked.completion == completion
    consumer.close()  # the caller crashed before its commit: the broker keeps the completion
    [delivery] = consumer.fetch(reply_to)
    assert delivery.completion == completion
    delivery.ack()
    assert list(consumer.fetch(reply_to)) == []
    publisher.close()
    consumer.close()


def test_an_unreachable_broker_is_reported_without_its_password(broker: RabbitMQ) -> None:
    url = f"amqp://liverfat:{broker.password}@127.0.0.1:1//"
    client = BrokerClient(celery_app(QueueSection(broker=url)))
    with pytest.raises(BrokerUnavailable) as raised:
        client.depth(SERIES_QUEUE)
    assert raised.value.reason is Reason.BROKER_UNAVAILABLE
    assert broker.password not in raised.value.message and "***" in raised.value.message
    assert not client.connected


_DEPTH = (
    "import sys\n"
    "from liverfat.service.config import QueueSection\n"
    "from liverfat.service.fleet.broker import BrokerClient, celery_app\n"
    "print(BrokerClient(celery_app(QueueSection(broker=sys.argv[1]))).depth(sys.argv[2]).ready)\n"
)


def test_a_broker_in_a_network_namespace_serves_that_namespace_only(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a network namespace needs root and ip (Debian package iproute2)")
    netns = f"lfbroker{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        with rabbitmq_server(tmp_path / "rabbitmq", netns=netns) as broker:
            inside = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _DEPTH, broker.url,
                                     SERIES_QUEUE], capture_output=True, text=True, check=False)  # fmt: skip
            assert inside.returncode == 0, inside.stderr
            assert inside.stdout.strip() == "0"
            with pytest.raises(BrokerUnavailable):
                BrokerClient(celery_app(QueueSection(broker=broker.url))).depth(SERIES_QUEUE)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


def test_amqps_needs_the_brokers_ca_and_a_client_certificate(tmp_path: Path) -> None:
    tls = make_certificates(tmp_path / "tls")
    other = make_certificates(tmp_path / "other-ca")
    with rabbitmq_server(tmp_path / "rabbitmq", tls=tls) as broker:
        secure = QueueSection(broker=broker.tls_url, ca_certificates=tls.ca_certificates, certificate=tls.certificate,
                              private_key=tls.private_key)  # fmt: skip
        client = BrokerClient(celery_app(secure))
        client.publish_task(a_task(node_reply_queue("TLS"), version=9))
        [delivery] = client.fetch(SERIES_QUEUE)
        assert delivery.headers["id"] == task_id("NODE", "1.2.3", 9)
        delivery.ack()
        client.close()
        no_client_certificate = replace(secure, certificate=None, private_key=None)
        other_ca = replace(secure, ca_certificates=other.ca_certificates)  # did not sign the broker's certificate
        for refused in (no_client_certificate, other_ca):
            with pytest.raises(BrokerUnavailable) as raised:
                BrokerClient(celery_app(refused)).depth(SERIES_QUEUE)
            assert "SSL" in raised.value.message and broker.password not in raised.value.message


def test_liverfat_worker_without_a_broker_says_what_to_set(tmp_path: Path) -> None:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("LIVERFAT_")}
    completed = subprocess.run([sys.executable, "-m", "liverfat.service.cli", "worker"], cwd=tmp_path, env=environ,
                               capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert completed.returncode == 2
    assert "[queue] broker is not set" in completed.stderr and "[config_invalid]" in completed.stderr
