"""Rates as people write them: ``"100/m"``, ``"10/s"``, ``"5/h"``, ``"1/30s"``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ebsqs.errors import ConfigurationError

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` starts per ``per`` seconds.

    Attributes:
        count: how many starts.
        per: in how many seconds.
    """

    count: float
    per: float

    @property
    def interval(self) -> float:
        """Seconds between two starts at this rate (the spacing limited tasks start at)."""
        return self.per / self.count

    def __str__(self) -> str:
        return f"{self.count:g}/{self.per:g}s"


def parse_rate(text: str) -> Rate:
    """``"100/m"`` as ``Rate(100, 60)``; units s, m, h, d (or sec, min, hour, day), with an
    optional multiple (``"1/30s"``).

    Raises:
        ConfigurationError: not ``count/unit``, or a count or multiple that is not > 0.
    """
    match = _RATE.fullmatch(text.lower()) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(3).removesuffix("s") or "s") if match else None
    if match and unit is None:
        unit = _UNITS.get(match.group(3))
    if match is None or unit is None:
        raise ConfigurationError(
            f"rate {text!r}: write count/unit, such as '100/m', '10/s', '5/h' or '1/30s' "
            "(units s, m, h, d)"
        )
    count = float(match.group(1))
    per = float(match.group(2) or 1) * unit
    if count <= 0 or per <= 0:
        raise ConfigurationError(f"rate {text!r}: the count and the period must be > 0")
    return Rate(count, per)
