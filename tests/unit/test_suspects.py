"""The host's list of tasks that hung a process (ebsqs.worker.suspects)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebsqs.worker.suspects import SuspectFile

pytestmark = pytest.mark.timeout(10)


def test_ids_added_by_the_master_are_seen_by_a_reader_and_a_torn_line_is_not(
    tmp_path: Path,
) -> None:
    reader = SuspectFile(tmp_path / "tokens")
    assert "t-1" not in reader  # no file yet: nothing listed, no error
    SuspectFile(tmp_path / "tokens").add("t-1")
    assert "t-1" in reader
    with reader.path.open("a") as half:
        half.write("t-2")  # a line still being written
    assert reader.ids() == {"t-1"}
    SuspectFile(tmp_path / "tokens").add("")
    assert reader.ids() == {"t-1", "t-2"}


def test_a_directory_that_cannot_be_written_is_logged_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    SuspectFile(blocker / "tokens").add("t-1")  # its parent is a file: OSError, logged
    assert "t-1" not in SuspectFile(blocker / "tokens")
