"""What a master runs beside its children: each a master extension (see :mod:`.extension`).

- the publishers of its snapshot for dashboards (:mod:`ebsqs.dashboard.publish`);
- the scheduler of periodic tasks (:mod:`ebsqs.periodic`);
- what integrations registered (:func:`~ebsqs.supervisor.extension.add_service`): the relay
  of the Django outbox when it is on (:mod:`ebsqs.contrib.django.outbox`), added by the app's
  ``ready()``, so nothing here imports an integration.

They are chosen here, before the master imports the app, so ``ebsqs supervise`` and ``manage.py
process_queue`` run the same set; one that depends on registered tasks looks at the registry in
:meth:`~ebsqs.supervisor.extension.Extension.on_starting`, once the app is imported.
"""

from __future__ import annotations

from ebsqs.dashboard.publish import publishers
from ebsqs.periodic.scheduler import schedulers
from ebsqs.supervisor.config import SupervisorConfig
from ebsqs.supervisor.extension import SERVICES, Extension


def services(config: SupervisorConfig) -> list[Extension]:
    """The extensions this master runs beside :class:`~ebsqs.ops.operations.Operations`."""
    registered = [extension for factory in SERVICES for extension in factory(config)]
    return [*publishers(config), *schedulers(config), *registered]
