"""Settings refuse what cannot work, whichever source it came from."""

from __future__ import annotations

import pytest

from ebsqs.config import Settings, load_settings
from ebsqs.errors import ConfigurationError

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("hard", "soft", "named"),
    [("60", "90", ""), ("emails=60,*=600", "emails=90", " for queue emails"), ("60", "*=61", "")],
)
def test_a_soft_limit_over_its_hard_limit_is_refused(hard: str, soft: str, named: str) -> None:
    with pytest.raises(ConfigurationError, match=f"soft limit{named} .* is over the hard limit"):
        Settings(time_limit=hard, soft_time_limit=soft)


def test_the_environment_is_checked_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBSQS_TIME_LIMIT", "30")
    monkeypatch.setenv("EBSQS_SOFT_TIME_LIMIT", "45")
    with pytest.raises(ConfigurationError, match=r"45 s.*30 s, time_limit"):
        load_settings()


def test_soft_limits_within_their_hard_limits_are_kept() -> None:
    settings = Settings(time_limit="emails=60,*=600", soft_time_limit="emails=50,*=500")
    assert settings.time_limits_for("emails") == (60.0, 50.0)
    assert settings.time_limits_for("reports") == (600.0, 500.0)
