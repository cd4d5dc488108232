"""The settings bridge (EBSQS and django-eb-sqs's names), override_settings, and system checks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from django.core import checks
from django.test import override_settings

from ebsqs.brokers.memory import MemoryBroker
from ebsqs.config import Settings, load_settings
from ebsqs.contrib.django import conf
from ebsqs.contrib.django.checks import check_ebsqs
from ebsqs.errors import ConfigurationError

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(autouse=True)
def _no_ebsqs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment variables outrank Django's settings; keep them out of these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("EBSQS_"):
            monkeypatch.delenv(name)


def test_override_settings_changes_broker_and_prefix_seen_by_delay() -> None:
    from shop.tasks import record

    with override_settings(EBSQS={"broker_url": "memory://one", "queue_prefix": "p1-"}):
        record.delay("x")
    with override_settings(EBSQS={"broker_url": "memory://two", "queue_prefix": "p2-"}):
        record.delay("y")
        record.delay("z")

    assert MemoryBroker.named("one").stats("p1-a").visible == 1
    assert MemoryBroker.named("two").stats("p2-a").visible == 2
    assert MemoryBroker.named("two").list_queues("p1-") == []


def test_ebsqs_dict_maps_lower_case_setting_names() -> None:
    with override_settings(
        EBSQS={"broker_url": "memory://x", "default_queue": "jobs", "default_max_retries": 3}
    ):
        settings = load_settings()
    assert (settings.broker_url, settings.default_queue, settings.default_max_retries) == (
        "memory://x",
        "jobs",
        3,
    )


def test_unknown_ebsqs_key_names_the_dict() -> None:
    unknown = pytest.raises(ConfigurationError, match=r"settings\.EBSQS has unknown key.*QUEUE")
    with override_settings(EBSQS={"QUEUE_PREFIX": "x-"}), unknown:
        load_settings()


LEGACY = {
    "EB_SQS_QUEUE_PREFIX": "eb-sqs-",
    "EB_SQS_DEFAULT_QUEUE": "jobs",
    "EB_SQS_DEFAULT_DELAY": 5,
    "EB_SQS_DEFAULT_MAX_RETRIES": 3,
    "EB_SQS_AUTO_ADD_QUEUE": False,
    "EB_SQS_EXECUTE_INLINE": True,
    "EB_SQS_WAIT_TIME_S": 2,
    "EB_SQS_QUEUE_VISIBILITY_TIMEOUT": "300",
    "EB_AWS_REGION": "eu-west-1",
}


def test_django_eb_sqs_names_keep_their_meaning() -> None:
    with override_settings(EBSQS={}, **LEGACY):
        settings = load_settings()
    assert settings.queue_prefix == "eb-sqs-"
    assert settings.default_queue == "jobs"
    assert settings.default_delay == 5
    # django-eb-sqs's max_retries counted attempts: 3 meant three runs, which is 2 retries.
    assert settings.default_max_retries == 2
    assert settings.auto_create_queues is False
    assert settings.eager is True
    assert settings.wait_seconds == 2
    assert settings.visibility_timeout == 300
    assert settings.broker_url == "sqs://eu-west-1"


def test_ebsqs_dict_wins_over_django_eb_sqs_names() -> None:
    with override_settings(
        EBSQS={"queue_prefix": "new-", "broker_url": "sqlite:///x.db"},
        EB_SQS_QUEUE_PREFIX="old-",
        EB_AWS_REGION="eu-west-1",
    ):
        settings = load_settings()
    assert (settings.queue_prefix, settings.broker_url) == ("new-", "sqlite:///x.db")


def test_region_fills_in_a_bare_sqs_url() -> None:
    with override_settings(EBSQS={"broker_url": "sqs://"}, EB_AWS_REGION="ap-south-1"):
        assert load_settings().broker_url == "sqs://ap-south-1"


def test_environment_outranks_django_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EBSQS_QUEUE_PREFIX", "env-")
    with override_settings(EBSQS={"queue_prefix": "django-"}):
        assert load_settings().queue_prefix == "env-"


def _ids(messages: list[checks.CheckMessage]) -> list[str]:
    return sorted(message.id or "" for message in messages)


def test_checks_pass_on_the_fixture_project() -> None:
    assert check_ebsqs() == []


@pytest.mark.parametrize(
    ("ebsqs", "expected"),
    [
        ({"broker_url": "redis://localhost"}, "ebsqs.E001"),
        ({"visibility_timeout": "soon"}, "ebsqs.E001"),
        ({"nonsense": 1}, "ebsqs.E001"),
        ({"broker_url": "memory://", "queue_prefix": "bad prefix/"}, "ebsqs.E002"),
        ({"broker_url": "memory://", "default_queue": "q" * 80}, "ebsqs.E002"),
        ({"broker_url": "memory://", "accept_pickle": True}, "ebsqs.W001"),
    ],
)
def test_checks_report_bad_settings(ebsqs: dict[str, object], expected: str) -> None:
    with override_settings(EBSQS=ebsqs):
        assert expected in _ids(check_ebsqs())


def test_check_sqs_without_region(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with override_settings(EBSQS={"broker_url": "sqs://"}):
        assert _ids(check_ebsqs()) == ["ebsqs.E003"]
    with override_settings(EBSQS={"broker_url": "sqs://eu-west-1"}):
        assert _ids(check_ebsqs()) == []


def test_checks_warn_about_django_eb_sqs_traps() -> None:
    # A django-eb-sqs settings file as it was: pickle on, no default queue, no region, no EBSQS.
    with override_settings(EBSQS=None, EB_SQS_USE_PICKLE=True, EB_SQS_AUTO_ADD_QUEUE=True):
        found = check_ebsqs()
    assert _ids(found) == ["ebsqs.W002", "ebsqs.W003", "ebsqs.W004"]
    assert "EB_SQS_USE_PICKLE" in next(m.msg for m in found if m.id == "ebsqs.W002")
    w003 = next(m for m in found if m.id == "ebsqs.W003")
    assert "EB_SQS_DEFAULT_QUEUE is not set" in w003.msg
    assert "'eb-sqs-default'" in w003.msg and "'default'" in w003.msg
    assert w003.hint == "Set EB_SQS_DEFAULT_QUEUE = 'eb-sqs-default' to keep using the same queues."
    w004 = next(m for m in found if m.id == "ebsqs.W004")
    assert "us-east-1" in (w004.hint or "")


@pytest.mark.parametrize(
    "named",
    [
        {"EB_SQS_DEFAULT_QUEUE": "eb-sqs-default"},
        {"EB_SQS_DEFAULT_QUEUE": "default"},  # a deliberate choice, even of ebsqs's default
        {"EBSQS": {"default_queue": "jobs"}},
    ],
    ids=["old name", "old name, new default", "EBSQS"],
)
def test_a_default_queue_named_anywhere_silences_w003(named: dict[str, object]) -> None:
    with override_settings(**{"EBSQS": None, "EB_AWS_REGION": "eu-west-1", **named}):
        assert _ids(check_ebsqs()) == []


def test_a_default_queue_from_the_environment_silences_w003(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EBSQS_DEFAULT_QUEUE", "eb-sqs-default")
    with override_settings(EBSQS=None, EB_AWS_REGION="eu-west-1"):
        assert _ids(check_ebsqs()) == []


def test_no_warning_about_the_prefix_whose_default_did_not_change() -> None:
    # django-eb-sqs 1.44's prefix defaulted to '', as ebsqs's does: nothing to keep.
    assert conf.LEGACY_DEFAULTS["EB_SQS_QUEUE_PREFIX"] == Settings().queue_prefix == ""
    with override_settings(EBSQS=None, EB_AWS_REGION="eu-west-1", EB_SQS_DEFAULT_QUEUE="q"):
        found = check_ebsqs()
    assert found == []
    assert "EB_SQS_QUEUE_PREFIX" not in " ".join(f"{m.msg} {m.hint}" for m in found)


README = Path(__file__).resolve().parents[2] / "README.md"
DEFAULT_CELL = re.compile(r"^\| `(EB_[A-Z_]+)` \(`([^`]+)`\)", re.MULTILINE)


def test_the_migration_guide_states_django_eb_sqs_s_real_defaults() -> None:
    text = README.read_text()
    section = text[
        text.index("## Moving from django-eb-sqs") : text.index("### Supported versions")
    ]
    stated = {name: ast.literal_eval(value) for name, value in DEFAULT_CELL.findall(section)}
    assert stated == conf.LEGACY_DEFAULTS


def test_checks_are_registered_with_django() -> None:
    from django.core.checks.registry import registry as check_registry

    with override_settings(EBSQS={"broker_url": "redis://"}):
        found = check_registry.run_checks(tags=["ebsqs"])
    assert "ebsqs.E001" in _ids(found)
