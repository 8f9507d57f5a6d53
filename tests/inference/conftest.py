"""Fixtures for the inference tests: the default model's real weights, fetched when missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from liverfat.inference.models.weights import fetch_default_weights


@pytest.fixture(scope="session")
def default_weights() -> Path:
    """The verified pyliverlesionseg 0.3 weight file in the model cache.

    The README setup (``deploy/setup.sh``) fetches it; if it is missing, this fixture runs the
    same fetch (pip download from PyPI), so the tests exercise exactly what a node uses.
    """
    return fetch_default_weights()
