"""The status file: how ``ebsqs status`` and ``ebsqs healthcheck`` see a running supervisor.

The master rewrites one small JSON document every tick (about once a second), atomically: it
writes a temporary file in the same directory and renames it over the old one, so a reader
never sees half a document. A file is simpler and sturdier than a control socket: it needs no
server thread in the master, it can be read while the master is busy or stuck (and then shows
how old it is), and permissions are those of the directory it lives in.

Where it lives, in order: ``--status-file``; next to ``--pidfile`` (``ebsqs.pid`` ->
``ebsqs.status.json``); else ``$XDG_RUNTIME_DIR/ebsqs/master-<pid>.json`` (or
``/tmp/ebsqs-<uid>/`` without ``XDG_RUNTIME_DIR``). The unit ``ebsqs systemd-unit`` prints puts it
in the unit's ``RuntimeDirectory`` (``/run/ebsqs/status.json``). Readers look in all of these.

Health, as :func:`check_health` judges it from a document: the master process is alive (same
pid, same start time), the document is fresh, the master is running (not starting or
stopping), every queue has its children, and every child has sent a heartbeat within half the
heartbeat timeout (:func:`stale_after`), is not being killed and is not degraded (its receives
keep failing: throttling, KMS errors, a broker that answers with errors). Empty queues are
healthy: idle children still send heartbeats.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebsqs.log import get_logger
from ebsqs.ops.depth import QueueDepth
from ebsqs.supervisor.snapshot import ChildSnapshot, Phase, SupervisorSnapshot

log = get_logger(__name__)

#: The document's format version; readers refuse others.
VERSION = 2  # 2: counts are named as in ebsqs.counters (succeeded, not done)
#: Seconds after which a status document counts as stale (the master writes every second).
DEFAULT_MAX_AGE = 10.0
#: Where systemd units keep their status files (``%t/ebsqs`` of a system unit).
SYSTEM_RUNTIME_DIR = Path("/run/ebsqs")
#: The state a worker's heartbeat reports while its receives keep failing.
DEGRADED = "degraded"
#: The counters of broker errors, shown by ``ebsqs status`` (names of :class:`Counters` fields).
ERROR_COUNTERS = ("receive_errors", "ack_errors", "throttled", "kms_errors")


class StatusError(Exception):
    """No usable status document: missing, unreadable or of another version."""


# -- where -----------------------------------------------------------------------------------


def default_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/ebsqs``, or ``/tmp/ebsqs-<uid>`` where that is unset."""
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "ebsqs"
    return Path(tempfile.gettempdir()) / f"ebsqs-{os.getuid()}"


def pidfile_status_path(pidfile: str | Path) -> Path:
    """The status file that goes with a pidfile: ``ebsqs.pid`` -> ``ebsqs.status.json``."""
    path = Path(pidfile)
    return path.with_name(f"{path.stem}.status.json")


def status_path(status_file: str | None, pidfile: str | None, pid: int) -> Path:
    """Where the master with ``pid`` writes its status (see the module docstring)."""
    if status_file:
        return Path(status_file)
    if pidfile:
        return pidfile_status_path(pidfile)
    return default_dir() / f"master-{pid}.json"


def find_status_files(status_file: str | None = None, pidfile: str | None = None) -> list[Path]:
    """The status files a reader should look at, newest first.

    An explicit ``status_file`` or ``pidfile`` names exactly one (which may not exist);
    otherwise every status file in the default directory and in ``/run/ebsqs``.
    """
    if status_file:
        return [Path(status_file)]
    if pidfile:
        return [pidfile_status_path(pidfile)]
    found: set[Path] = set()
    for directory in (default_dir(), SYSTEM_RUNTIME_DIR):
        for pattern in ("*.json", "*/status.json"):
            with contextlib.suppress(OSError):
                found.update(p for p in directory.glob(pattern) if not p.name.startswith("."))
    return sorted(found, key=_mtime, reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# -- writing (in the master) -----------------------------------------------------------------


def document(
    snapshot: SupervisorSnapshot,
    *,
    heartbeat_timeout: float,
    metrics_url: str | None = None,
    now: float | None = None,
    depths: Mapping[str, QueueDepth] | None = None,
) -> dict[str, Any]:
    """The status document for a snapshot: plain JSON types only.

    Args:
        snapshot: the master's snapshot.
        heartbeat_timeout: the master's, so readers judge heartbeats as the master does.
        metrics_url: where metrics are served, if they are.
        now: wall-clock time the snapshot was taken (default: now).
        depths: the queues' depths from the master's sampler, if it samples.
    """
    return {
        "version": VERSION,
        "written_at": time.time() if now is None else now,
        "master": {
            "pid": snapshot.pid,
            "create_time": _create_time(snapshot.pid),
            "state": str(snapshot.state),
            "uptime": round(snapshot.uptime, 3),
            "heartbeat_timeout": heartbeat_timeout,
            "metrics_url": metrics_url,
        },
        "targets": dict(snapshot.targets),
        "counts": snapshot.counts.flat(),
        "restarts": snapshot.restarts,
        "recycled": snapshot.recycled,
        "degraded": sum(1 for child in snapshot.children if child.state == DEGRADED),
        "children": [_child_document(child) for child in snapshot.children],
        "queues": {queue: _depth_document(depth) for queue, depth in (depths or {}).items()},
        # Per task, the master's lifetime totals (TaskStats.to_wire): the dashboard's task page.
        "tasks": dict(snapshot.counts.task_wire()),
    }


def _depth_document(depth: QueueDepth) -> dict[str, Any]:
    return {
        "visible": depth.visible,
        "in_flight": depth.in_flight,
        "delayed": depth.delayed,
        "dead_letters": depth.dead_letters,
        "sampled_at": round(depth.sampled_at, 3) if depth.sampled_at else None,
        "stale": depth.stale,
    }


def _child_document(child: ChildSnapshot) -> dict[str, Any]:
    task = child.task
    return {
        "queue": child.queue,
        "slot": child.slot,
        "pid": child.pid,
        "phase": str(child.phase),
        "state": child.state,
        "generation": child.generation,
        "uptime": round(child.uptime, 3),
        "heartbeat_age": round(child.heartbeat_age, 3),
        "in_flight": child.in_flight,
        "task": None
        if task is None
        else {
            "name": task.name,
            "task_id": task.task_id,
            # As the last heartbeat saw it, not extrapolated: a 50 ms task that ended just
            # after that beat would otherwise show as running for up to a second, until the
            # next beat (which no longer names it).
            "running_for": _rounded(_at_beat(task.running_for, child.heartbeat_age)),
            "deadline_in": _rounded(task.deadline_in),
        },
        "counts": child.counts.flat(),
        "rss": child.rss,
        "restarts": child.restarts,
        "last_error": child.last_error,
        "last_error_age": _rounded(child.last_error_age),
    }


def _at_beat(running_for: float | None, heartbeat_age: float) -> float | None:
    return None if running_for is None else max(running_for - heartbeat_age, 0.0)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _create_time(pid: int) -> float | None:
    import psutil  # here, not at the top: every ebsqs command imports this module's CLI

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def write_status(path: str | Path, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``doc`` atomically (a temporary file, then ``os.replace``).

    Creates the directory (mode 0755) if needed; the file is 0644 so operators can read it.

    Raises:
        OSError: the directory or file cannot be written.
    """
    target = Path(path)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    data = json.dumps(doc, separators=(",", ":")).encode()
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def probe_writable(path: str | Path, *, create_directory: bool = True) -> None:
    """Prove now that the master will be able to write ``path`` (its status file or pidfile).

    Both are written as a temporary file in the same directory, then renamed over the target,
    so what must work is creating a file there; the target itself must not be a directory.
    Run before anything starts, so a bad path is a one-line error at once, not a status that
    never appears (the master only logs a failed status write, and keeps running).

    Args:
        path: the file the master will write.
        create_directory: make missing directories, as :func:`write_status` does (the pidfile's
            directory must exist already).

    Raises:
        OSError: the directory cannot be made or written, or ``path`` is a directory.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(target))
    if create_directory:
        try:
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except FileExistsError:  # a file where a directory should be, on the way
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(target)) from None
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    os.unlink(temporary)


class StatusFile:
    """The master's status file: written each tick, removed at exit, failures logged once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failed = False

    def write(self, doc: Mapping[str, Any]) -> None:
        """Replace the file; an error is logged (once) and otherwise ignored."""
        try:
            write_status(self.path, doc)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.error("status_file_failed", path=str(self.path), error=str(exc))
            return
        self._failed = False

    def remove(self) -> None:
        """Delete the file (the master exits: no one should read a dead master's status)."""
        with contextlib.suppress(OSError):
            self.path.unlink()


# -- reading ---------------------------------------------------------------------------------


def read_status(path: str | Path) -> dict[str, Any]:
    """The status document at ``path``.

    Raises:
        StatusError: the file is missing, unreadable, not JSON or of another version.
    """
    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise StatusError(f"no status file at {path}: is the supervisor running?") from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read the status file {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise StatusError(f"{path} is not an ebsqs status file of version {VERSION}")
    problem = shape_problem(doc)
    if problem is not None:
        raise StatusError(f"{path} is a damaged ebsqs status file: {problem}")
    return doc


_NUMBER = (int, float)
#: What readers rely on, key by key: the rest of a document may vary between versions of ebsqs.
_DOCUMENT_SHAPE: dict[str, Any] = {
    "written_at": _NUMBER,
    "master": dict,
    "targets": dict,
    "counts": dict,
    "restarts": int,
    "children": list,
}
_MASTER_SHAPE: dict[str, Any] = {
    "pid": int,
    "state": str,
    "uptime": _NUMBER,
    "heartbeat_timeout": _NUMBER,
}
_CHILD_SHAPE: dict[str, Any] = {
    "queue": str,
    "slot": int,
    "pid": int,
    "phase": str,
    "state": str,
    "uptime": _NUMBER,
    "heartbeat_age": _NUMBER,
    "counts": dict,
    "rss": int,
    "restarts": int,
}
_TASK_SHAPE: dict[str, Any] = {"name": str, "running_for": (*_NUMBER, type(None))}


def shape_problem(doc: Mapping[str, Any]) -> str | None:
    """What is missing or mistyped in a status document (one phrase), or None if it is sound.

    A reader checks this once, so that rendering and health judgement never meet a
    ``KeyError`` half-way (a file damaged by hand, or by a full disk).
    """
    problem = _missing(doc, _DOCUMENT_SHAPE, "")
    if problem is None:
        problem = _missing(doc["master"], _MASTER_SHAPE, "master.")
    if problem is None and not all(isinstance(n, int) for n in doc["targets"].values()):
        problem = "targets must map queues to numbers of children"
    if problem is None:
        problems = (_child_problem(c, f"children[{i}].") for i, c in enumerate(doc["children"]))
        problem = next((found for found in problems if found is not None), None)
    return problem


def _child_problem(child: Any, where: str) -> str | None:
    problem = _missing(child, _CHILD_SHAPE, where)
    task = child.get("task") if problem is None else None
    if task is not None:
        problem = _missing(task, _TASK_SHAPE, f"{where}task.")
    return problem


def _missing(value: Any, shape: Mapping[str, Any], where: str) -> str | None:
    if not isinstance(value, Mapping):
        return f"{where.rstrip('.') or 'the document'} is not an object"
    for key, kind in shape.items():
        if key not in value:
            return f"{where}{key} is missing"
        if not isinstance(value[key], kind) or isinstance(value[key], bool):
            return f"{where}{key} has the wrong type ({type(value[key]).__name__})"
    return None


@dataclass(frozen=True, slots=True)
class Health:
    """A verdict: healthy or not, and why not (one line)."""

    ok: bool
    reason: str = "healthy"


def master_alive(doc: Mapping[str, Any]) -> bool:
    """Whether the process that wrote ``doc`` still runs (same pid *and* start time)."""
    import psutil  # here, not at the top: every ebsqs command imports this module's CLI

    master = doc["master"]
    try:
        process = psutil.Process(int(master["pid"]))
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = master.get("create_time")
        return created is None or abs(process.create_time() - float(created)) < 1.0
    except psutil.Error:
        return False


def age(doc: Mapping[str, Any], now: float | None = None) -> float:
    """Seconds since the document was written."""
    return max((time.time() if now is None else now) - float(doc["written_at"]), 0.0)


def check_health(
    doc: Mapping[str, Any], now: float | None = None, max_age: float = DEFAULT_MAX_AGE
) -> Health:
    """Judge a status document (see the module docstring for the rules)."""
    now = time.time() if now is None else now
    master = doc["master"]
    if not master_alive(doc):
        return Health(False, f"master {master['pid']} is not running")
    stale = age(doc, now)
    if stale > max_age:
        return Health(False, f"status is {stale:.0f} s old: the master is not updating it")
    if master["state"] not in ("running", "reloading"):
        return Health(False, f"master {master['pid']} is {master['state']}")
    for verdict in (_children_health(doc, stale), _queues_health(doc)):
        if not verdict.ok:
            return verdict
    return Health(True)


def _queues_health(doc: Mapping[str, Any]) -> Health:
    reloading = doc["master"]["state"] == "reloading"
    up = {str(Phase.BOOTING), str(Phase.RUNNING)}
    for queue, target in doc["targets"].items():
        count = sum(1 for c in doc["children"] if c["queue"] == queue and c["phase"] in up)
        if count < target - (1 if reloading else 0):
            return Health(False, f"queue {queue}: {count} of {target} children up (restarting)")
    return Health(True)


def stale_after(heartbeat_timeout: float) -> float:
    """Seconds of silence after which a child counts as unhealthy: half the heartbeat timeout.

    Heartbeats come every second, so such a child missed many; the master kills it at the full
    timeout. Health checks and the systemd watchdog both use this threshold.
    """
    return heartbeat_timeout / 2


def _children_health(doc: Mapping[str, Any], stale: float) -> Health:
    timeout = stale_after(float(doc["master"]["heartbeat_timeout"]))
    for child in doc["children"]:
        name = f"{child['queue']} #{child['slot']} (pid {child['pid']})"
        if child["phase"] == str(Phase.KILLING):
            return Health(False, f"child {name} is hung or overdue and being killed")
        silent = float(child["heartbeat_age"]) + stale
        if silent > timeout:
            return Health(False, f"child {name} sent no heartbeat for {silent:.0f} s")
        if child["state"] == DEGRADED:
            return Health(False, f"child {name} is degraded: {_degraded_reason(child)}")
    return Health(True)


def _degraded_reason(child: Mapping[str, Any]) -> str:
    """Why a degraded child is: its receives keep failing, with the error counts so far."""
    counts = child["counts"]
    found = ", ".join(f"{_label(name)} {counts.get(name, 0)}" for name in ERROR_COUNTERS)
    return f"its receives keep failing ({found})"


def _label(counter: str) -> str:
    return counter.replace("_", " ").replace("kms", "KMS")


def live_view(doc: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """``doc`` as of ``now``: ages advanced by the document's age, plus alive and health.

    This is what ``ebsqs status --json`` prints.
    """
    now = time.time() if now is None else now
    stale = age(doc, now)
    health = check_health(doc, now)
    view: dict[str, Any] = json.loads(json.dumps(doc))
    # A task's running time stays as its child's last heartbeat reported it: the task may have
    # ended since (see ChildSnapshot.task); the heartbeat's age says how old that news is.
    for child in view["children"]:
        child["heartbeat_age"] = round(child["heartbeat_age"] + stale, 3)
        child["uptime"] = round(child["uptime"] + stale, 3)
        if child.get("last_error_age") is not None:
            child["last_error_age"] = round(child["last_error_age"] + stale, 3)
    view["age"] = round(stale, 3)
    view["degraded"] = sum(1 for child in view["children"] if child["state"] == DEGRADED)
    view["alive"] = master_alive(doc)
    view["healthy"] = health.ok
    view["reason"] = health.reason
    return view


# -- rendering -------------------------------------------------------------------------------

_COLUMNS = (
    "QUEUE",
    "#",
    "PID",
    "STATE",
    "TASK",
    "FOR",
    "DONE",
    "FAILED",
    "RETRIED",
    "ERRORS",
    "RESTARTS",
    "RSS",
    "LAST ERROR",
)


def render_table(view: Mapping[str, Any]) -> str:
    """A status view (see :func:`live_view`) as a header line and a table of children."""
    master, counts = view["master"], view["counts"]
    header = (
        f"ebsqs master {master['pid']}: {master['state']}, up {duration(master['uptime'])}, "
        f"{len(view['children'])} children, done {counts.get('succeeded', 0)}, "
        f"failed {counts.get('failed', 0)}, retried {counts.get('retried', 0)}, "
        f"restarts {view['restarts']}"
    )
    verdict = "healthy" if view["healthy"] else f"UNHEALTHY: {view['reason']}"
    lines = [header, f"status {view['age']:.1f} s old, {verdict}"]
    if any(counts.get(name, 0) for name in ERROR_COUNTERS):
        errors = ", ".join(f"{_label(name)} {counts.get(name, 0)}" for name in ERROR_COUNTERS)
        lines.append(f"broker errors: {errors}")
    lines += _depth_lines(view.get("queues") or {})
    rows = [_COLUMNS, *(_row(child) for child in view["children"])]
    lines += ["", *_aligned(rows, right={1, 2, 5, 6, 7, 8, 9, 10, 11})]
    return "\n".join(lines)


def _row(child: Mapping[str, Any]) -> tuple[str, ...]:
    task, counts = child.get("task"), child["counts"]
    state = child["state"] if child["phase"] == "running" else f"{child['state']}/{child['phase']}"
    return (
        child["queue"],
        str(child["slot"]),
        str(child["pid"]),
        state,
        _shorten(task["name"], 40) if task else "-",
        duration(task["running_for"]) if task and task["running_for"] is not None else "-",
        str(counts.get("succeeded", 0)),
        str(counts.get("failed", 0)),
        str(counts.get("retried", 0)),
        str(sum(counts.get(name, 0) for name in ERROR_COUNTERS)),
        str(child["restarts"]),
        _bytes(child["rss"]),
        _last_error(child),
    )


def _last_error(child: Mapping[str, Any]) -> str:
    error, ago = child.get("last_error"), child.get("last_error_age")
    if not error:
        return "-"
    return f"{_shorten(str(error), 70)} ({duration(ago)} ago)" if ago is not None else str(error)


def _depth_lines(queues: Mapping[str, Any]) -> list[str]:
    """One line per queue: its depth and dead-letter depth at the master's last sample."""
    lines = []
    for queue, depth in sorted(queues.items()):
        dead = depth.get("dead_letters")
        when = depth.get("sampled_at")
        note = (
            "not sampled yet"
            if when is None
            else time.strftime("at %H:%M:%S", time.localtime(when))
        )
        if depth.get("stale"):
            note += ", stale: the broker did not answer since"
        lines.append(
            f"queue {queue}: {depth.get('visible', 0)} waiting, {depth.get('in_flight', 0)} in "
            f"flight, {depth.get('delayed', 0)} delayed, "
            f"{'no' if dead is None else dead} dead letters ({note})"
        )
    return lines


def _aligned(rows: Sequence[Sequence[str]], right: Iterable[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = set(right)
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def duration(seconds: float) -> str:
    """``12.3s``, ``3m05s``, ``2h10m``, ``3d04h``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count}B"
    value, unit = count / 1024, "K"
    for bigger in ("M", "G"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}{unit}"
