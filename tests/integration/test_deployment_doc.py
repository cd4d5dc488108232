"""docs/deployment.md tried as a new user would: its commands run, and the unit it shows is the
one ``ebsqs systemd-unit`` prints for the command it shows.

The only difference allowed is the program's path: the page runs ebsqs from
``/srv/myapp/.venv``, this test from the checkout's environment.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from ebsqs.ops.systemd import ebsqs_program
from tests import servers
from tests.integration.processes import clean_env, run_ebsqs

DOC = servers.ROOT / "docs" / "deployment.md"
FENCE = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block, in order."""
    return [(match[1], match[2]) for match in FENCE.finditer(DOC.read_text())]


def commands(text: str) -> list[list[str]]:
    """The ``$`` command lines of a console block, continuations joined, pipes cut off."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.startswith("$ "):
            found.append(shlex.split(line[2:].split(" | ")[0]))
    return found


def systemd_unit_commands() -> list[tuple[list[str], str | None]]:
    """Each documented ``ebsqs systemd-unit`` command's arguments, and the ini block right after
    its console block (the unit it is documented to print), if there is one."""
    found = []
    fenced = blocks()
    for index, (language, text) in enumerate(fenced):
        if language != "console":
            continue
        following = fenced[index + 1] if index + 1 < len(fenced) else ("", "")
        for words in commands(text):
            if len(words) > 1 and words[0].endswith("/ebsqs") and words[1] == "systemd-unit":
                shown = following[1] if following[0] == "ini" else None
                found.append((words, shown))
    return found


@pytest.mark.timeout(60)
def test_the_unit_shown_is_the_unit_printed() -> None:
    documented = systemd_unit_commands()
    assert documented and documented[0][1] is not None, "no systemd-unit command with its unit"
    words, shown = documented[0]
    result = run_ebsqs(*words[1:], env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    printed = result.stdout.replace(shlex.join(ebsqs_program()), words[0])
    assert printed == shown


@pytest.mark.timeout(60)
def test_every_documented_systemd_unit_command_works() -> None:
    for words, _ in systemd_unit_commands():
        result = run_ebsqs(*words[1:], env=clean_env())
        assert result.returncode == 0, f"{shlex.join(words)}: {result.stderr}"
        assert "Type=notify" in result.stdout


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or shutil.which("systemd-escape") is None,
    reason="systemd's tools are not installed (Debian/Ubuntu: apt-get install systemd)",
)
def test_the_documented_template_instance_passes_verify(tmp_path: Path) -> None:
    [template] = [w for w, _ in systemd_unit_commands() if "--template" in w]
    unit = run_ebsqs(*template[1:], "--working-directory", str(tmp_path), env=clean_env())
    (tmp_path / "ebsqs@.service").write_text(unit.stdout)
    name = subprocess.run(
        ["systemd-escape", "--template=ebsqs@.service", "emails:4,reports:2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # systemd-analyze verify reads "path:alias", so spell the colons as %I unescapes them.
    instance = name.replace(":", "\\x3a")
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
