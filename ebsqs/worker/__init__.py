"""The worker: one process's receive-execute-ack loop and the threads and records beside it.

Modules: :mod:`.loop` (the loop, in the process's main thread), :mod:`.keeper` (the thread that
extends visibility, settles overruns and sends heartbeats), :mod:`.settle` (what becomes of a
message once it has an outcome: the only writer to the broker), :mod:`.held` (the messages the
worker holds, shared by the loop and the keeper, and the status heartbeats report).
"""

from ebsqs.worker.held import RunningTask, WorkerState, WorkerStatus
from ebsqs.worker.loop import FastStop, Worker, WorkerOptions

__all__ = ["FastStop", "RunningTask", "Worker", "WorkerOptions", "WorkerState", "WorkerStatus"]
