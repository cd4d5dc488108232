"""Django set up once for ``tests/django``, on the fixture project in ``tests/fixtures/djproject``.

Databases: ``default`` is a SQLite file in a temporary directory; ``postgres`` is a database
created for this run on 127.0.0.1:5432 when PostgreSQL is there (tests that need it skip with a
reason otherwise). Both are migrated once per session. Subprocesses (``manage.py ...``) get the
same databases through the environment (:func:`djproject_env`).

What the app's ``ready()`` registers process-wide (settings source, middleware) is taken
out again right after setup and put back only around each test here, so tests elsewhere in the
session never see Django's settings or middleware.

Fixtures: ``django_state`` (autouse), ``db_alias`` (parametrized: sqlite, postgres),
``pg_alias`` (postgres or skip), ``memory_broker``, ``clean_rows``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests import postgres

PROJECT = Path(__file__).resolve().parent.parent / "fixtures" / "djproject"
PG_DSN = postgres.DSN
PG_SKIP_REASON = postgres.unavailable()
PG_NAME = f"ebsqs_dj_{os.getpid()}_{uuid.uuid4().hex[:6]}"
TMP = Path(tempfile.mkdtemp(prefix="ebsqs-dj-"))

os.environ["DJANGO_SETTINGS_MODULE"] = "djproject.settings"
os.environ["DJPROJECT_SQLITE"] = str(TMP / "default.sqlite3")
os.environ["DJPROJECT_EVIL_MARK"] = str(TMP / "evil-imported")
if PG_SKIP_REASON is None:
    os.environ["DJPROJECT_POSTGRES"] = PG_NAME
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import django  # noqa: E402

django.setup()

import shop_tasks  # noqa: E402, F401 - the django-eb-sqs port: its tasks are the project's too

from ebsqs import config, middleware, producer  # noqa: E402
from ebsqs.registry import registry  # noqa: E402
from tests import servers  # noqa: E402

# What ready() registered, kept aside and installed around each test of this directory.
_REGISTERED = (list(config.SOURCES), list(middleware.MIDDLEWARE))
config.SOURCES.clear()
middleware.MIDDLEWARE.clear()
_TASKS = dict(registry._tasks)


def djproject_env(**extra: str) -> dict[str, str]:
    """The environment of a ``manage.py`` subprocess sharing this session's databases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EBSQS_", "AWS_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PROJECT), str(PROJECT.parent.parent.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return {**env, **extra}


@pytest.fixture(scope="session", autouse=True)
def _databases() -> Iterator[None]:
    """Create PostgreSQL's database (if there is one), migrate both; drop it at the end."""
    from django.core.management import call_command
    from django.db import connections

    if PG_SKIP_REASON is None:
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{PG_NAME}"')
    for alias in connections:
        call_command("migrate", database=alias, verbosity=0, interactive=False)
    yield
    connections.close_all()
    if PG_SKIP_REASON is None:
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{PG_NAME}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def django_state() -> Iterator[None]:
    """Install the app's registrations and tasks for one test; restore the session's after.

    structlog's configuration too: commands run in-process configure it for their own output.
    """
    logging = structlog.get_config()
    saved = (list(config.SOURCES), list(middleware.MIDDLEWARE))
    saved_tasks = dict(registry._tasks)
    sources, registered = _REGISTERED
    config.SOURCES[:] = sources
    middleware.MIDDLEWARE[:] = registered
    registry._tasks.update(_TASKS)
    try:
        yield
    finally:
        config.SOURCES[:], middleware.MIDDLEWARE[:] = saved
        registry._tasks.clear()
        registry._tasks.update(saved_tasks)
        structlog.configure(**logging)
        structlog.contextvars.clear_contextvars()


@pytest.fixture(
    params=["default", pytest.param("postgres", marks=pytest.mark.postgres)],
    ids=["sqlite", "postgres"],
)
def db_alias(request: pytest.FixtureRequest) -> str:
    """Each database in turn: ``default`` (SQLite file) and ``postgres`` (or a skip)."""
    if request.param == "postgres" and PG_SKIP_REASON is not None:
        pytest.skip(PG_SKIP_REASON)
    return str(request.param)


@pytest.fixture
def pg_alias() -> str:
    """``postgres``, or a skip saying why there is no PostgreSQL."""
    if PG_SKIP_REASON is not None:
        pytest.skip(PG_SKIP_REASON)
    return "postgres"


@pytest.fixture(autouse=True)
def clean_rows() -> Iterator[None]:
    """Empty the rows table of every database before each test."""
    from django.db import connections
    from shop.models import Row

    for alias in connections:
        Row.objects.using(alias).all().delete()
    yield
    for alias in connections:
        with contextlib.suppress(Exception):
            connections[alias].close()


@pytest.fixture
def tmp_djproject() -> Path:
    """The fixture project's directory (the working directory of ``manage.py`` runs)."""
    return PROJECT


@pytest.fixture
def sqs(fauxqs_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This process sends to fauxqs under a fresh queue prefix; returns the subprocess env."""
    prefix = f"dj{uuid.uuid4().hex[:8]}-"
    servers.apply_sqs_env(monkeypatch, fauxqs_server)
    monkeypatch.setenv("EBSQS_QUEUE_PREFIX", prefix)
    producer.broker_for.cache_clear()  # a broker cached by another test may know another server
    yield {**servers.sqs_env_vars(fauxqs_server), "EBSQS_QUEUE_PREFIX": prefix}
    producer.broker_for.cache_clear()
