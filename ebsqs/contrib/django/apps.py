"""The Django app: ``INSTALLED_APPS += ["ebsqs.contrib.django"]``."""

from __future__ import annotations

from django.apps import AppConfig


class EbsqsConfig(AppConfig):
    """Registers ebsqs's checks, settings source and hooks, and imports every ``tasks`` module.

    Nothing else happens here: no settings are read, no broker or database is touched.
    """

    name = "ebsqs.contrib.django"
    label = "ebsqs"
    verbose_name = "ebsqs task queue"

    def ready(self) -> None:
        """Register once (a second call, as some tests make, adds nothing)."""
        from django.core import checks
        from django.utils.module_loading import autodiscover_modules

        from ebsqs import config, hooks
        from ebsqs.contrib.django import conf, db, transactions
        from ebsqs.contrib.django.checks import check_ebsqs
        from ebsqs.task import COMMIT_HOOKS

        checks.register(check_ebsqs, "ebsqs")
        if conf.settings_source not in config.SOURCES:
            config.SOURCES.append(conf.settings_source)
        hooks.add(db.DJANGO_HOOKS)
        db.register_fork_handler()
        if transactions.COMMIT_HOOK not in COMMIT_HOOKS:
            COMMIT_HOOKS.append(transactions.COMMIT_HOOK)
        autodiscover_modules("tasks")
