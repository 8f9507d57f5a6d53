"""``liverfat config check`` and ``liverfat --version``, through the real command-line entry point."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from liverfat import __version__
from liverfat.service import cli
from liverfat.service.config import load_config

BROKEN = """
[node]
port = 70000
ae_title = "A TITLE FAR TOO LONG FOR DICOM"

[spool]
keep_days = -1

[send]
destinations = ["nonsense"]

[http]
token = "do-not-print-me"

[bogus]
x = 1
"""


def test_config_check_lists_every_problem_at_once_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVERFAT_WORKER_MAX_ATTEMPTS", "zero")
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN)
    assert cli.main(["config", "check", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"liverfat: configuration from {path.resolve()} is invalid:"
    assert "  unknown section [bogus]; known: node, spool, series" in err
    assert "  [node] ae_title: an AE title has at most 16 characters, got 30" in err
    assert "  [node] port must be at most 65535, got 70000" in err
    assert "  [spool] keep_days must not be negative, got -1" in err
    assert "  [worker] max_attempts must be a whole number, got 'zero'" in err
    assert "  [send] destinations[0]: a destination is written AE@host:port, got 'nonsense'" in err
    assert "do-not-print-me" not in err


def test_config_check_prints_the_effective_configuration_with_secrets_redacted_that_loads_back_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVERFAT_SEND_DESTINATIONS", "PACS@10.0.0.5:104")
    path = tmp_path / "node.toml"
    path.write_text('[node]\nae_title = "FATNODE"\nallowed_callers = ["ORTHANC@10.0.0.5"]\n\n'
                    '[http]\ntoken = "do-not-print-me"\n\n[grading]\nthreshold_hu = 38.5\n')  # fmt: skip
    assert cli.main(["config", "check", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"# {path.resolve()} is valid.")
    assert 'token = "REDACTED"' in shown and "do-not-print-me" not in shown
    assert 'destinations = [\n    "PACS@10.0.0.5:104",\n]' in shown and "threshold_hu = 38.5" in shown
    assert "min_free_disk_mb = 500" in shown and "nearly_full_margin_mb = 1024" in shown, "defaults are shown"

    echoed = tmp_path / "effective.toml"
    echoed.write_text(shown.replace('"REDACTED"', '"do-not-print-me"'))
    original, again = load_config(path), load_config(echoed, environ={})
    assert dataclasses.replace(again, source=None) == dataclasses.replace(original, source=None)


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"liverfat {__version__}\n"
