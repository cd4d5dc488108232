"""``ebsqs systemd-unit`` output checked by systemd's own parser: ``systemd-analyze verify``.

``verify`` exits 0 even for lines it ignores (an unknown key, a bad value), so every test also
requires it to print nothing. It checks that ExecStart's program exists, which it does: the unit
runs this environment's ``ebsqs`` by its absolute path. Without systemd-analyze (a machine
without systemd) these tests skip; the unit text is still covered by ``tests/unit``.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import servers
from tests.integration.processes import APP, clean_env, run_ebsqs

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)",
)


def unit_text(*args: str) -> str:
    result = run_ebsqs("systemd-unit", *args, env=clean_env())
    assert result.returncode == 0, result.stderr
    return result.stdout


def verify(directory: Path, unit_name: str) -> None:
    """Run ``systemd-analyze verify``; fail on any complaint."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(directory / unit_name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def setting(unit: str, key: str) -> str:
    values = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(f"{key}=")]
    assert len(values) == 1, f"{key} appears {len(values)} times"
    return values[0]


@pytest.mark.timeout(60)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = unit_text(
        "--app",
        APP,
        "--queues",
        "emails:4,reports",
        "--log-format",
        "json",
        "--graceful-timeout",
        "40",
        "--user",
        getpass.getuser(),
        "--working-directory",
        str(servers.ROOT),
        "--environment-file",
        "-/etc/ebsqs/ebsqs.env",
    )
    (tmp_path / "ebsqs.service").write_text(unit)
    verify(tmp_path, "ebsqs.service")
    assert int(setting(unit, "TimeoutStopSec")) > 40
    assert setting(unit, "Type") == "notify"
    assert setting(unit, "ExecStart").split()[0].startswith("/")


@pytest.mark.timeout(60)
def test_template_unit_passes_for_an_instance(tmp_path: Path) -> None:
    unit = unit_text("--template", "--app", APP, "--graceful-timeout", "5")
    (tmp_path / "ebsqs@.service").write_text(unit)
    # The instance name of the queue list "emails,reports" (systemd-escape turns "," into \x2c).
    verify(tmp_path, "ebsqs@emails\\x2creports.service")
    assert int(setting(unit, "TimeoutStopSec")) > 5
