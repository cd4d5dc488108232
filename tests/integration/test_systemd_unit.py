"""``ebsqs systemd-unit`` output checked by systemd's own tools: ``systemd-analyze verify`` (the
unit parses and can start) and ``systemd-analyze security`` (how exposed the sandbox leaves it).

``verify`` exits 0 even for lines it ignores (an unknown key, a bad value), so every test also
requires it to print nothing. It checks that ExecStart's program exists, which it does: the unit
runs this environment's ``ebsqs`` by its absolute path. Without systemd-analyze (a machine
without systemd) these tests skip; the unit text is still covered by ``tests/unit``.
"""

from __future__ import annotations

import getpass
import re
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


#: The exposure systemd-analyze rates "OK" or better; the unit was 9.6 ("UNSAFE") unhardened.
MAX_EXPOSURE = 4.0
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")


def exposure(directory: Path, unit_name: str) -> float:
    """``systemd-analyze security --offline=yes``'s overall exposure of a unit file."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(directory / unit_name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = EXPOSURE.search(result.stdout + result.stderr)
    assert found is not None, result.stdout + result.stderr
    return float(found[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "unit_name", "file_name"),
    [
        (["--app", APP, "--queues", "emails"], "ebsqs.service", "ebsqs.service"),
        (
            [
                "--app",
                APP,
                "--queues",
                "emails:2",
                "--broker",
                "sqlite:////var/lib/ebsqs/broker.db",
                "--pidfile",
                "/run/ebsqs-pid/master.pid",
                "--user",
                getpass.getuser(),
                "--environment-file",
                "-/etc/ebsqs/ebsqs.env",
            ],
            "ebsqs.service",
            "ebsqs.service",
        ),
        (["--template", "--app", APP], "ebsqs@emails.service", "ebsqs@.service"),
    ],
    ids=["plain", "sqlite, pidfile and user", "template"],
)
def test_the_unit_is_hardened_and_still_verifies(
    tmp_path: Path, args: list[str], unit_name: str, file_name: str
) -> None:
    unit = unit_text("--working-directory", str(servers.ROOT), *args)
    (tmp_path / file_name).write_text(unit)

    verify(tmp_path, unit_name)
    assert exposure(tmp_path, unit_name) <= MAX_EXPOSURE
    assert setting(unit, "ProtectSystem") == "strict"
    assert setting(unit, "NoNewPrivileges") == "yes"


@pytest.mark.timeout(60)
def test_the_unhardened_unit_would_fail_the_exposure_check(tmp_path: Path) -> None:
    """The measure can fail: without its sandbox lines the same unit is rated far worse."""
    unit = unit_text("--app", APP, "--queues", "emails", "--working-directory", str(servers.ROOT))
    sandbox = ("Protect", "Private", "Restrict", "NoNew", "Capability", "SystemCall", "UMask")
    bare = "\n".join(line for line in unit.splitlines() if not line.startswith(sandbox))
    (tmp_path / "ebsqs.service").write_text(bare + "\n")
    assert exposure(tmp_path, "ebsqs.service") > MAX_EXPOSURE
