"""Django integration: ``INSTALLED_APPS += ["ebsqs.contrib.django"]``.

- Settings from an ``EBSQS`` dict (and django-eb-sqs's ``EB_SQS_*`` names), read when used.
- ``tasks`` modules of every installed app are imported at startup.
- Database hygiene around tasks and forks; ``.delay_on_commit()``.
- ``manage.py process_queue``, ``manage.py ebsqs ...``, ``manage.py healthcheck``.
- A backend for Django's Tasks framework (:mod:`ebsqs.contrib.django.tasks_backend`).
"""
