"""The supervisor behind ``ebsqs supervise``: a prefork master and its worker children.

The master imports the app once, then forks N children per queue, which share its memory
copy-on-write. Each child runs the worker loop (:mod:`ebsqs.worker`) on one queue and reports a
heartbeat over a pipe about once a second. The master replaces children that crash (backing off
when a slot keeps crashing), kills those that hang (SIGABRT, then SIGKILL), recycles them after
``--max-tasks-per-child`` tasks or ``--max-memory-per-child`` MiB, and stops when a child cannot
boot instead of restarting it forever.

Signals to the master:

====== ==================================================================================
TERM   graceful drain: children stop receiving, release fetched messages they have not
INT    started, finish running tasks until ``--graceful-timeout``, then are killed; exit 0.
       A second TERM / INT stops fast.
QUIT   fast stop: children release every message at once and exit; exit 0.
HUP    rolling restart onto code imported afresh, one child per queue at a time, never
       fewer than N-1 consuming per queue.
TTIN   one more child per queue.
TTOU   one fewer child per queue (never below one).
====== ==================================================================================

Children drain on a direct SIGTERM too (systemd stops every process of the unit), ignore
SIGINT / HUP / TTIN / TTOU (the master's business), and drain and exit if the master dies.

Modules: :mod:`.config` (what the supervisor is told), :mod:`.table` (the master's bookkeeping
and decisions, no processes), :mod:`.master` (forks, signals, the loop), :mod:`.child` (after
the fork), :mod:`.heartbeat` (the pipe protocol), :mod:`.snapshot` (the read model),
:mod:`.extension` (the typed hooks :mod:`ebsqs.ops` builds sd_notify, status and metrics on),
:mod:`.reload` (fresh code on HUP), :mod:`.process` (small OS helpers).

This package's ``__init__`` imports nothing, so that importing one part (the snapshot types, for
``ebsqs status``) does not import the master and psutil with it.
"""
