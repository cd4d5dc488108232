"""The Django app: ``INSTALLED_APPS += ["ebsqs.contrib.django"]``."""

from __future__ import annotations

from django.apps import AppConfig


class EbsqsConfig(AppConfig):
    """Registers ebsqs's checks, settings source, middleware and the outbox's relay (a master
    service), and imports every ``tasks`` module.

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
        from ebsqs.contrib.django import conf, db, outbox, transactions
        from ebsqs.contrib.django.checks import check_ebsqs, check_outbox
        from ebsqs.supervisor.extension import add_service

        checks.register(check_ebsqs, "ebsqs")
        checks.register(check_outbox, "ebsqs")
        if conf.settings_source not in config.SOURCES:
            config.SOURCES.append(conf.settings_source)
        middleware.add(db.DB_HYGIENE)
        middleware.add(transactions.SEND_ON_COMMIT)
        middleware.add(outbox.OUTBOX)
        add_service(outbox.relays)
        db.register_fork_handler()
        autodiscover_modules("tasks")
