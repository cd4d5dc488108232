"""Operations: what a supervisor tells the outside world, and the commands that read it.

Modules: :mod:`.operations` (the master's extension that feeds the rest), :mod:`.status` (the
status file behind ``ebsqs status`` and ``ebsqs healthcheck``), :mod:`.metrics` (Prometheus text
from the master's snapshot, and its HTTP server), :mod:`.systemd` (sd_notify and the unit
``ebsqs systemd-unit`` prints), :mod:`.cli` (those commands). Nothing here controls processes:
it reads the supervisor's frozen snapshots.
"""
