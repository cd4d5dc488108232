"""Reading Prometheus text exposition in tests: a strict little parser, not a client library."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')

Key = tuple[str, frozenset[tuple[str, str]]]


def parse(text: str) -> dict[Key, float]:
    """Every sample in ``text``, keyed by name and label set.

    Raises:
        AssertionError: a line that is neither a comment nor a well-formed sample, a sample
            without a ``# TYPE`` line before it, or a repeated sample.
    """
    samples: dict[Key, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"malformed sample line: {line!r}"
        name, labels_text, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"no # TYPE before {name}"
        labels = frozenset(
            (k, v.encode().decode("unicode_escape")) for k, v in _LABEL.findall(labels_text or "")
        )
        key = (name, labels)
        assert key not in samples, f"sample repeated: {line!r}"
        samples[key] = float(value)
    return samples


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    """The value of one sample (0 when it is absent: counters not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
