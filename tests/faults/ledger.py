"""Reading the ledger the fault suite's tasks write, and the verdicts drawn from it.

The ledger (``tests/fixtures/ledger_tasks.py``) and the dead-letter queue are the only evidence
the fault tests accept: they say what ran, whatever ebsqs says about itself, and never lag as a
server's approximate queue counters do.

- *lost*: a key that was sent, never finished, and is not in the dead-letter queue;
- *duplicates*: keys that finished more than once, with how many extra finishes each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One ledger line."""

    event: str
    pid: int
    task_id: str
    key: str
    attempt: int


class Ledger:
    """The ledger file of one test (it may not exist yet: nothing ran).

    Args:
        path: the file named by ``$EBSQS_TEST_LEDGER``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self, event: str | None = None) -> list[Entry]:
        """Every whole line, in file order (only ``event`` lines if given).

        A line still being written (no newline yet) is not read: Linux lets a ``read`` see part
        of a concurrent ``write``, even an ``O_APPEND`` one.
        """
        if not self.path.exists():
            return []
        text = self.path.read_text()
        # A reader can see a write in progress: the last line counts once its newline is there.
        whole = text[: text.rfind("\n") + 1]
        found = []
        for line in whole.splitlines():
            parts = line.split(" ")
            if len(parts) != 5:
                raise AssertionError(f"torn or foreign ledger line in {self.path}: {line!r}")
            if event is None or parts[0] == event:
                found.append(Entry(parts[0], int(parts[1]), parts[2], parts[3], int(parts[4])))
        return found

    def started(self) -> Counter[str]:
        """How often each key started."""
        return Counter(entry.key for entry in self.entries("start"))

    def finished(self) -> Counter[str]:
        """How often each key finished."""
        return Counter(entry.key for entry in self.entries("finish"))

    def lost(self, sent: Iterable[str], dead_lettered: Iterable[str] = ()) -> set[str]:
        """Keys sent that neither finished nor reached the dead-letter queue."""
        return set(sent) - set(self.finished()) - set(dead_lettered)

    def duplicates(self) -> dict[str, int]:
        """``{key: extra finishes}`` of the keys that finished more than once."""
        return {key: count - 1 for key, count in self.finished().items() if count > 1}

    def extra_runs(self) -> int:
        """Finishes beyond the first, summed over every key."""
        return sum(self.duplicates().values())

    def summary(self, sent: Iterable[str], dead_lettered: Iterable[str] = ()) -> str:
        """A line for failure messages: what finished, what is lost, what ran twice."""
        sent = list(sent)
        lost = sorted(self.lost(sent, dead_lettered))
        return (
            f"sent {len(sent)}, finished {len(self.finished())} keys "
            f"({len(self.entries('finish'))} finishes), lost {len(lost)} {lost[:10]}, "
            f"duplicates {self.extra_runs()}"
        )
