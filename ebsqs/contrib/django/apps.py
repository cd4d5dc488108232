"""The Django app: ``INSTALLED_APPS += ["ebsqs.contrib.django"]``."""

from __future__ import annotations

from django.apps import AppConfig


class EbsqsConfig(AppConfig):
    """Registers ebsqs's checks, settings source and middleware, and imports every ``tasks``
    module.

    Nothing else happens here: no settings are read, no broker or database is touched.
    """

    name = "ebsqs.contrib.django"
    label = "ebsqs"
    verbose_name = "ebsqs task queue"

    def ready(self) -> None:
        """Register once (a second call, as some tests make, adds nothing)."""
        from django.core import checks
        from django.utils.module_loading import autodiscover_modules

        from ebsqs import config, middleware
        from ebsqs.contrib.django import conf, db, transactions
        from ebsqs.contrib.django.checks import check_ebsqs

        checks.register(check_ebsqs, "ebsqs")
        if conf.settings_source not in config.SOURCES:
            config.SOURCES.append(conf.settings_source)
        middleware.add(db.DB_HYGIENE)
        middleware.add(transactions.SEND_ON_COMMIT)
        db.register_fork_handler()
        autodiscover_modules("tasks")
