"""deploy/ agrees with itself: Orthanc's configuration, the Lua routing, compose, systemd and the node's example."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from liverfat.service.config import NodeConfig, SendSection, WorkerSection, load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def orthanc_json(path: Path) -> Any:
    """Orthanc's configuration format: JSON with // comments."""
    return json.loads(re.sub(r"^\s*//.*$|\s+//[^\"\n]*$", "", path.read_text(), flags=re.MULTILINE))


def node_key_in_lua() -> str:
    found = re.search(r"local LIVERFAT = '([^']+)'", (DEPLOY / "orthanc" / "autoroute.lua").read_text())
    assert found is not None, "autoroute.lua names the node's DicomModalities key in `local LIVERFAT = '...'`"
    return found.group(1)


@pytest.fixture(scope="module")
def example() -> NodeConfig:
    return load_config(DEPLOY / "liverfat.example.toml", environ={})


def test_orthanc_configuration_registers_the_node_of_the_example_and_loads_the_lua(example: NodeConfig) -> None:
    orthanc = orthanc_json(DEPLOY / "orthanc" / "orthanc.json")
    node = orthanc["DicomModalities"][node_key_in_lua()]
    assert (node["AET"], node["Port"]) == (example.node.ae_title, example.node.port)
    assert [str(d) for d in example.send.destinations] == [f"{orthanc['DicomAet']}@127.0.0.1:{orthanc['DicomPort']}"]
    assert [c.ae_title for c in example.node.allowed_callers] == [orthanc["DicomAet"]]
    assert any(script.endswith("liverfat-autoroute.lua") for script in orthanc["LuaScripts"])


def test_compose_wires_orthanc_and_the_node_to_each_other() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    orthanc, node = compose["services"]["orthanc"], compose["services"]["liverfat"]
    config = load_config(None, environ=node["environment"])
    modalities = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"])
    registered = modalities[node_key_in_lua()]
    expected = (config.node.ae_title, "liverfat", config.node.port)
    assert (registered["AET"], registered["Host"], registered["Port"]) == expected
    [destination] = config.send.destinations
    assert (destination.ae_title, destination.host) == (orthanc["environment"]["ORTHANC__DICOM_AET"], "orthanc")
    lua_target = next(v.split(":")[1] for v in orthanc["volumes"] if "autoroute.lua" in v)
    assert json.loads(orthanc["environment"]["ORTHANC__LUA_SCRIPTS"]) == [lua_target]


def test_systemd_unit_stops_the_node_gracefully() -> None:
    unit = dict(re.findall(r"^(\w+)=(.*)$", (DEPLOY / "liverfat.service").read_text(), flags=re.MULTILINE))
    assert "liverfat serve --config /etc/liverfat/liverfat.toml" in unit["ExecStart"]
    assert unit["KillMode"] == "mixed", "SIGTERM to the node only: it stops its worker itself"
    grace = WorkerSection().shutdown_grace_s + SendSection().timeout_s
    assert float(unit["TimeoutStopSec"]) > grace
