"""The node's configuration: embedded defaults, TOML, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import Caller, Destination, check_ae_title, load_config, output_settings

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
    assert config.grading == {"threshold_hu": 42}


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
        "LIVERFAT_MODEL_CACHE": "/models: read by the weights loader, not a [model] key",
        "PATH": "/usr/bin",
    }
    config = load_config(path, environ=environ)
    assert config.node.port == 12000 and config.node.ae_title == "ENVNODE"
    assert config.series.complete_on_release is True
    assert config.send.destinations == (Destination("A", "h1", 104), Destination("B", "h2", 11112))
    assert config.grading == {"threshold_hu": 38.5}
    assert config.eligibility == {"require_chest_evidence": False}
    site = output_settings(config)
    assert site.institution_name == "Clinique du Lac" and site.station_name == "ENVNODE"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("[node]\nprot = 1\n", {}, "unknown key.*prot.*\\[node\\]"),
        ("[nodes]\n", {}, "unknown section.*nodes"),
        ("[node]\nport = 70000\n", {}, "port 70000"),
        ("[node]\nport = 'x'\n", {}, "\\[node\\] port must be a whole number"),
        ("[node]\nae_title = 'A_TITLE_THAT_IS_TOO_LONG'\n", {}, "at most 16 characters"),
        ("[node]\nae_title = 'BAD\\\\AE'\n", {}, "backslash"),
        ("", {"LIVERFAT_NODE_PORTT": "1"}, "unknown key.*portt"),
        ("", {"LIVERFAT_SERIES_STABLE_SECONDS": "0"}, "stable_seconds must be greater than 0"),
        ("[send]\ndestinations = ['ORTHANC@127.0.0.1']\n", {}, "AE@host:port"),
        ("[model]\ndevice = 'tpu'\n", {}, "device must be one of"),
        ("[worker]\nineligible_result = 'pdf'\n", {}, "ineligible_result must be one of"),
        ("[tls]\nenabled = true\n", {}, "certificate is required"),
        ("[spool]\nkeep_days = -1\n", {}, "keep_days must not be negative"),
        ("[outputs]\ninstitution_name = '" + "X" * 65 + "'\n", {}, "\\[outputs\\] output setting institution_name.*1 to 64"),
        ("[grading]\nthreshold = 40\n", {}, "\\[analysis\\].*unknown grading setting"),
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
