"""Packaging for ebsqs. Tool configuration lives in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    name="ebsqs",
    version="0.1.0",
    description="A supervised, prefork task queue for Python and Django on Amazon SQS",
    long_description=open("README.md", encoding="utf-8").read(),  # noqa: SIM115
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ebsqs", "ebsqs.*"]),
    package_data={
        "ebsqs": ["py.typed"],
        # The dashboard ships its own assets: no CDN (production networks have no internet).
        "ebsqs.dashboard": ["static/*", "templates/*"],
        "ebsqs.contrib.django": ["templates/ebsqs/*"],
    },
    install_requires=[
        "boto3>=1.34",
        "click>=8.1",
        "psutil>=5.9",
        "structlog>=24.1",
    ],
    extras_require={
        "django": ["django>=4.2"],
        "proctitle": ["setproctitle>=1.3"],
        "otel": ["opentelemetry-api>=1.25"],
        "dashboard": ["waitress>=2.1"],  # `ebsqs dashboard` without Django (see the README)
        "redis": ["redis>=5"],  # flow control's shared store (EBSQS_FLOW_STORE=redis://...)
        "cron": ["cronsim>=2.9"],  # @periodic(cron=...): maintained, typed, Debian cron's DST rules
        "test": [
            "moto[server]>=5.0",
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",  # `make test` runs two processes
            "django>=4.2,<6.1",  # 5.2 on Python 3.11; .ci/django-versions runs 4.2 and 6.0
            "django-tasks>=0.8",
            "psycopg[binary]>=3.1",
            "setproctitle>=1.3",
            # AWS's own claim-check client: large payloads must travel both ways with it.
            "amazon-sqs-extended-client>=1.0",
            "opentelemetry-sdk>=1.25",
            "sentry-sdk>=2",  # its logging integration must see a failed task once
            "waitress>=2.1",  # `ebsqs dashboard`
            "selenium>=4.10",  # the dashboard's browser tests (Debian's chromium-driver)
            "redis>=5",  # flow control's Redis store
            "cronsim>=2.9",  # @periodic(cron=...)
        ],
        "dev": ["ruff>=0.6", "mypy>=1.11", "boto3-stubs[sqs,s3]", "django-stubs"],
    },
    entry_points={
        "console_scripts": ["ebsqs = ebsqs.cli:run_cli"],
        "ebsqs.executors": [
            "inline = ebsqs.executors.inline:InlineExecutor",
            "thread = ebsqs.executors.thread:ThreadExecutor",
            "process = ebsqs.executors.process:ProcessExecutor",
            "asyncio = ebsqs.executors.asyncio:AsyncioExecutor",
        ],
        "ebsqs.brokers": [
            "sqs = ebsqs.brokers.sqs:SQSBroker",
            "sqlite = ebsqs.brokers.sqlite:SQLiteBroker",
            "memory = ebsqs.brokers.memory:MemoryBroker",
        ],
    },
    classifiers=[
        "Framework :: Django",
        "Programming Language :: Python :: 3.11",
        "Topic :: System :: Distributed Computing",
    ],
)
