"""The node's configuration: embedded defaults, TOML, environment overrides, clear errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from liverfat.dicom_io.eligibility import EligibilityPolicy
from liverfat.errors import LiverfatError, Reason
from liverfat.inference.models.store import default_model_store
from liverfat.service.config import Caller, Destination, check_ae_title, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "liverfat.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "liverfat.toml"
    path.write_text(text)
    return path


def test_embedded_defaults_listen_on_11112_as_liverfat_and_send_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    assert (config.node.ae_title, config.node.port) == ("LIVERFAT", 11112)
    assert config.node.allowed_callers == ()
    assert config.send.destinations == ()
    assert config.series.stable_seconds == 10.0
    assert config.spool.dir == tmp_path / "liverfat-spool"
    assert config.worker.ineligible_result == "nothing"


def test_toml_values_and_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
[node]
ae_title = "PACSNODE"
port = 11113
allowed_callers = ["ORTHANC@127.0.0.1", "MODALITY"]
[spool]
dir = "spool"
[send]
destinations = ["ORTHANC@127.0.0.1:4242", { ae_title = "BACKUP", host = "10.0.0.6", port = 104 }]
first_delay_s = 0.5
[grading]
threshold_hu = 42
""")
    config = load_config(path, environ={})
    assert config.node.ae_title == "PACSNODE" and config.node.port == 11113
    assert config.node.allowed_callers == (Caller("ORTHANC", "127.0.0.1"), Caller("MODALITY"))
    assert config.spool.dir == tmp_path / "spool"
    assert config.send.destinations == (
        Destination("ORTHANC", "127.0.0.1", 4242), Destination("BACKUP", "10.0.0.6", 104))  # fmt: skip
    assert config.send.first_delay_s == 0.5
    assert config.analysis.grading.threshold_hu == 42.0


def test_environment_overrides_every_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 11113\n")
    environ = {
        "LIVERFAT_NODE_PORT": "12000",
        "LIVERFAT_NODE_AE_TITLE": "ENVNODE",
        "LIVERFAT_SERIES_COMPLETE_ON_RELEASE": "yes",
        "LIVERFAT_SEND_DESTINATIONS": "A@h1:104,B@h2:11112",
        "LIVERFAT_GRADING_THRESHOLD_HU": "38.5",
        "LIVERFAT_ELIGIBILITY_REQUIRE_CHEST_EVIDENCE": "false",
        "LIVERFAT_OUTPUTS_INSTITUTION_NAME": "Clinique du Lac",
        "LIVERFAT_SOMETHING_ELSE": "ignored: not a section of the node's configuration",
        "LIVERFAT_MODEL_CACHE": "/models",
        "PATH": "/usr/bin",
    }
    config = load_config(path, environ=environ)
    assert config.node.port == 12000 and config.node.ae_title == "ENVNODE"
    assert config.series.complete_on_release is True
    assert config.send.destinations == (Destination("A", "h1", 104), Destination("B", "h2", 11112))
    assert config.analysis.grading.threshold_hu == 38.5
    assert config.eligibility.require_chest_evidence is False
    assert config.model.cache == Path("/models")
    assert config.site.institution_name == "Clinique du Lac" and config.site.station_name == "ENVNODE"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("[node]\nprot = 1\n", {}, "unknown key.*prot.*\\[node\\]"),
        ("[nodes]\n", {}, "unknown section.*nodes"),
        ("[node]\nport = 70000\n", {}, "\\[node\\] port must be at most 65535, got 70000"),
        ("[node]\nport = 'x'\n", {}, "\\[node\\] port must be a whole number"),
        ("[node]\nport = true\n", {}, "\\[node\\] port must be a whole number, got True"),
        ("[node]\nae_title = 'A_TITLE_THAT_IS_TOO_LONG'\n", {}, "at most 16 characters"),
        ("[node]\nae_title = 'BAD\\\\AE'\n", {}, "backslash"),
        ("", {"LIVERFAT_NODE_PORTT": "1"}, "unknown key.*portt"),
        ("", {"LIVERFAT_SERIES_STABLE_SECONDS": "0"}, "stable_seconds must be greater than 0"),
        ("", {"LIVERFAT_NODE": "x"}, "LIVERFAT_NODE names no key"),
        ("[send]\ndestinations = ['ORTHANC@127.0.0.1']\n", {}, "AE@host:port"),
        ("[model]\ndevice = 'tpu'\n", {}, "\\[model\\] device: unknown device 'tpu', expected one of auto, cpu, cuda"),
        ("[worker]\nineligible_result = 'pdf'\n", {}, "ineligible_result must be one of 'nothing' or 'sr'"),
        ("[tls]\nenabled = true\n", {}, "\\[tls\\] certificate: required when TLS is enabled"),
        ("[spool]\nkeep_days = -1\n", {}, "keep_days must not be negative"),
        ("[outputs]\ninstitution_name = '" + "X" * 65 + "'\n", {}, "\\[outputs\\] output setting institution_name.*1 to 64"),
        ("[grading]\nthreshold = 40\n", {}, "\\[grading\\] unknown grading setting"),
        ("[analysis]\ngrading = { threshold_hu = 40 }\n", {}, "\\[analysis\\] grading settings belong in"),
        ("[analysis]\nworking_spacing_mm = 5\n", {}, "\\[analysis\\].*three positive mm"),
        ("node = 5\n", {}, "\\[node\\] must be a table"),
        ("[eligibility]\nmax_slice_thickness_mm = -1\n", {}, "\\[eligibility\\].*must be > 0"),
        ("[node\n", {}, "cannot read configuration"),
    ],
)
def test_invalid_configuration_is_refused_with_the_key_and_the_problem(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(LiverfatError, match=message) as raised:
        load_config(write(tmp_path, text), environ=environ)
    assert raised.value.reason is Reason.CONFIG_INVALID


@pytest.mark.parametrize(
    ("title", "valid"),
    [("LIVERFAT", True), ("A" * 16, True), ("A" * 17, False), ("   ", False), ("NO\\PE", False), ("TAB\tAE", False),
     ("ÄE", False)],
)  # fmt: skip
def test_ae_titles_follow_ps3_5(title: str, valid: bool) -> None:
    assert (check_ae_title(title) is None) is valid


def test_the_example_configuration_in_deploy_is_valid() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.send.destinations, "the example shows a destination"
    assert config.node.allowed_callers, "the example shows an allowed caller"


def test_every_problem_is_reported_at_once_one_per_line(tmp_path: Path) -> None:
    text = """
[node]
port = 70000
[send]
destinations = ["ORTHANC@127.0.0.1:x"]
[grading]
threshold = 40
[eligibility]
max_slice_thickness_mm = -1
"""
    with pytest.raises(LiverfatError) as raised:
        load_config(write(tmp_path, text), environ={"LIVERFAT_SERIES_STABLE_SECONDS": "0"})
    problems = raised.value.message.splitlines()[1:]
    assert [line.split()[:2] for line in problems] == [
        ["[node]", "port"], ["[series]", "stable_seconds"], ["[eligibility]", "eligibility"],
        ["[grading]", "unknown"], ["[send]", "destinations[0]"],
    ]  # fmt: skip


def test_any_cuda_device_is_accepted(tmp_path: Path) -> None:
    assert load_config(None, environ={"LIVERFAT_MODEL_DEVICE": "cuda:1"}).model.device == "cuda:1"


def test_the_model_cache_is_configured_and_reaches_the_model_store(tmp_path: Path) -> None:
    assert load_config(None, environ={}).model.cache == Path.home() / ".cache" / "liverfat" / "models"
    config = load_config(write(tmp_path, "[model]\ncache = 'models'\n"), environ={})
    assert default_model_store(config.model.cache) == tmp_path / "models" / "nnunet"
    config = load_config(None, environ={"LIVERFAT_MODEL_CACHE": str(tmp_path / "env")})
    assert default_model_store(config.model.cache) == tmp_path / "env" / "nnunet"


def test_the_typed_sections_are_built_once_with_grading_inside_the_analysis(tmp_path: Path) -> None:
    path = write(tmp_path, "[grading]\nthreshold_hu = 38\n[analysis]\nroi_mode = 'robust'\n")
    config = load_config(path, environ={})
    assert isinstance(config.eligibility, EligibilityPolicy)
    assert config.analysis.roi_mode.value == "robust" and config.analysis.grading is config.grading
    assert config.site is config.site and config.site.station_name == "LIVERFAT"
    regraded = replace(config, grading=replace(config.grading, threshold_hu=30.0))
    assert regraded.analysis.grading.threshold_hu == 30.0


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("[worker]\ndevices = 'gpu'\n", {}, "devices: must be \"auto\" .*, \"cpu\", or GPU indices like \\[0, 1\\], got 'gpu'"),
        ("[worker]\ndevices = [0, -1]\n", {}, "got \\[0, -1\\]"),
        ("[worker]\ndevices = []\n", {}, "GPU indices like \\[0, 1\\], got \\[\\]"),
        ("", {"LIVERFAT_WORKER_DEVICES": "0,0"}, "devices: lists a GPU twice \\('0,0'\\)"),
        ("[worker]\nname = 'gpu1@a'\n", {}, "name: must be letters, digits, .* got 'gpu1@a'"),
        ("", {"LIVERFAT_WORKER_NAME": "-gpu1"}, "name: must be .*a letter or digit first"),
    ],
)
def test_worker_devices_and_names_are_refused_in_one_readable_line(tmp_path: Path, text: str, environ: dict[str, str],
                                                                    message: str) -> None:  # fmt: skip
    with pytest.raises(LiverfatError, match=message) as raised:
        load_config(write(tmp_path, text), environ=environ)
    assert str(raised.value).count("\n") == 1, "one line under the heading"


def test_worker_devices_and_name_read_words_lists_and_the_environment(tmp_path: Path) -> None:
    assert load_config(None, environ={}).worker.devices == "auto"
    assert load_config(None, environ={"LIVERFAT_WORKER_DEVICES": "1, 3"}).worker.devices == (1, 3)
    assert load_config(write(tmp_path, "[worker]\ndevices = 'CPU'\ncount = 3\n"), environ={}).worker.devices == "cpu"
    assert load_config(None, environ={"LIVERFAT_WORKER_NAME": "gpu1-b.2"}).worker.name == "gpu1-b.2"
    assert load_config(None, environ={}).worker.name is None, "the fleet worker's default: <host>-<devices>"
