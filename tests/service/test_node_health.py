"""A real node turning red: no model weights, a worker that keeps dying, a nearly full spool.

Issue 18 item 6: with no weights the node logged an ERROR while ``/healthz`` answered 200 "ok"
and ``liverfat status`` showed nothing wrong. The first test runs the real ``liverfat serve``
code path (``node_main --real-model``) with an empty ``[model] cache``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from liverfat.inference.backend import Backend
from liverfat.service import cli
from liverfat.service.config import NodeConfig, load_config
from liverfat.service.node import Node
from tests.service.conftest import free_port
from tests.service.node_process import NodeProcess, toml, wait_for

pytestmark = pytest.mark.slow


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def sections(tmp_path: Path, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    base: dict[str, dict[str, Any]] = {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "spool": {"dir": str(tmp_path / "spool"), "min_free_disk_mb": 0, "nearly_full_margin_mb": 0},
        "send": {"destinations": ["PACS@127.0.0.1:11112"]},
        "http": {"host": "127.0.0.1", "port": free_port()},
    }
    for name, keys in extra.items():
        base.setdefault(name, {}).update(keys)
    return base


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.close()


def test_no_model_weights_turn_health_red_with_the_reason_and_status_shows_it(
    tmp_path: Path, nodes: list[NodeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty-model-cache"
    empty.mkdir()
    node = NodeProcess(tmp_path / "node", sections(tmp_path, model={"cache": str(empty)}))
    nodes.append(node)
    node.start(wait_model=False, real_model=True)
    port = node.config.http.port
    _, body = wait_for(lambda: (h := healthz(port))[0] == 503 and h, 60, "/healthz to answer 503")
    (problem,) = body["problems"]
    assert problem.startswith("the model cannot be loaded: the default model's weights")
    assert str(empty) in problem and "every series fails until this is fixed" in problem
    assert body["model"]["loaded"] is False and body["worker_up"] is True

    assert cli.main(["status", "--config", str(node.config_path)]) == 0
    shown = capsys.readouterr().out
    assert f"PROBLEM: {problem}" in shown and "model: NOT LOADED: the default model's weights" in shown
    [worker] = body["workers"]
    assert (worker["name"], worker["device"], worker["up"], worker["model"]["loaded"]) == ("worker-0", "cpu", True, False)
    assert f"  worker-0 on {worker['host']} (cpu): up, 0 series done, 0 restart(s), model NOT LOADED" in shown
    assert node.terminate() == 0


def die_at_model_load() -> Backend:
    """A model whose loading kills the worker process (a crashing native library, say)."""
    os._exit(3)


@pytest.fixture
def node_config(tmp_path: Path) -> NodeConfig:
    path = tmp_path / "liverfat.toml"
    path.write_text(toml(sections(tmp_path, spool={"nearly_full_margin_mb": 2**40})))
    return load_config(path, environ={})


def test_a_worker_that_keeps_dying_and_a_nearly_full_spool_are_red_and_counted(node_config: NodeConfig) -> None:
    node = Node(node_config, load_model=die_at_model_load)
    node.start()
    try:
        port = node_config.http.port

        def worker_down() -> dict[str, Any] | None:
            node.tick()
            code, body = healthz(port)
            return body if code == 503 and body["worker_restarts"] >= 1 and not body["worker_up"] else None

        body = wait_for(worker_down, 60, "the worker to die, be restarted and die again", interval=0.2)
        problems = body["problems"]
        assert any(p.startswith("the worker process is not running (it died ") for p in problems), problems
        assert any(p.startswith("spool is nearly full: ") for p in problems), problems
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        assert families["liverfat_worker_restarts"].samples[0].value >= 1
        assert families["liverfat_healthy"].samples[0].value == 0
    finally:
        node.stop()
