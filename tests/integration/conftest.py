"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.processes import Backend, open_backend


@pytest.fixture
def backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Backend]:
    """``moto``, ``fauxqs`` or ``sqlite`` (indirect parametrization; ``sqlite`` when not
    parametrized), for this process too."""
    with open_backend(
        getattr(request, "param", "sqlite"), request, monkeypatch, tmp_path
    ) as opened:
        yield opened
