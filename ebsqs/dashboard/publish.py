"""Where a master publishes its snapshot for dashboards on other hosts.

Without Django, the status file the master writes anyway is what ``ebsqs dashboard`` reads
(``--status`` names others: files or directories, e.g. shared ones). With Django set up and
``ebsqs.contrib.django`` installed (``manage.py process_queue``), the master also writes its row
of the ``MasterSnapshot`` table (:mod:`ebsqs.contrib.django.publish`), which the Django
dashboard reads for every host.
"""

from __future__ import annotations

import sys

from ebsqs.supervisor.config import SupervisorConfig
from ebsqs.supervisor.extension import Extension


def publishers(config: SupervisorConfig) -> list[Extension]:
    """The extensions that publish this master's snapshot beyond its status file."""
    if "django" not in sys.modules:  # never import Django for a process that did not
        return []
    from django.apps import apps

    if not apps.ready or not apps.is_installed("ebsqs.contrib.django"):
        return []
    from ebsqs.contrib.django.publish import SnapshotPublisher

    return [SnapshotPublisher(config.heartbeat_timeout)]
