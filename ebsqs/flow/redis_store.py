"""Flow control's store in Redis (``flow_store = "redis://127.0.0.1:6379/0"``): every host that
names the same Redis shares the limits. Each operation is one Lua script (one round trip,
atomic). Keys carry a hash tag, so a limit's keys share a cluster slot.
"""

from __future__ import annotations

import os
from typing import Any

from ebsqs.errors import ConfigurationError
from ebsqs.flow.base import TICKET_GRACE, FlowStoreError

try:
    import redis
except ImportError:  # pragma: no cover - the extra is missing
    redis = None  # type: ignore[assignment]

#: Seconds a call to Redis may take before flow control gives up on it (and fails open).
TIMEOUT = 2.0
PREFIX = "ebsqs:flow:"

_TAKE_SLOT = """
local now, early, interval = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local kept = redis.call('GET', KEYS[2])
if kept then
  if tonumber(kept) <= now + early then redis.call('DEL', KEYS[2]) end
  return kept
end
local slot = tonumber(redis.call('GET', KEYS[1]) or '0')
if slot < now then slot = now end
local tat = slot + interval
local keep = math.ceil((tat - now + interval) * 1000)
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', keep)
local text = string.format('%.6f', slot)
if slot > now + early then
  redis.call('SET', KEYS[2], text, 'PX', math.ceil((slot - now + tonumber(ARGV[4])) * 1000))
end
return text
"""

_ACQUIRE = """
local now, limit, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000)
return 1
"""

_CLAIM = """
local kept = redis.call('GET', KEYS[1])
if kept then return kept end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

_UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """See :class:`~ebsqs.flow.store.FlowStore`.

    Args:
        url: a redis-py URL (``redis://host:6379/0``, ``rediss://``, ``unix://``).

    Raises:
        ConfigurationError: the ``redis`` library is not installed.
    """

    def __init__(self, url: str) -> None:
        if redis is None:
            raise ConfigurationError(
                "flow_store is a Redis URL but the redis library is missing: "
                "pip install 'ebsqs[redis]'"
            )
        self.url = url
        self._pid = -1
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    def _redis(self) -> Any:
        # A client per process: redis-py's pool must not be shared across a fork.
        if self._pid != os.getpid():
            self._client = redis.Redis.from_url(
                self.url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
            )
            self._scripts = {}
            self._pid = os.getpid()
        return self._client

    def _script(self, name: str, text: str) -> Any:
        client = self._redis()
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = client.register_script(text)
        return script

    def _run(self, name: str, text: str, keys: list[str], args: list[object]) -> Any:
        try:
            return self._script(name, text)(keys=keys, args=args)
        except redis.RedisError as exc:
            raise FlowStoreError(f"flow store {self.url}: {exc}") from exc

    def _call(self, method: str, *args: object, **kwargs: object) -> Any:
        try:
            return getattr(self._redis(), method)(*args, **kwargs)
        except redis.RedisError as exc:
            raise FlowStoreError(f"flow store {self.url}: {exc}") from exc

    def take_slot(self, key: str, interval: float, ticket: str, now: float, early: float) -> float:
        """See :meth:`FlowStore.take_slot`."""
        keys = [f"{PREFIX}{{{key}}}:tat", f"{PREFIX}{{{key}}}:ticket:{ticket}"]
        return float(self._run("slot", _TAKE_SLOT, keys, [now, early, interval, TICKET_GRACE]))

    def acquire(self, key: str, limit: int, holder: str, ttl: float, now: float) -> bool:
        """See :meth:`FlowStore.acquire`."""
        return bool(self._run("acquire", _ACQUIRE, [PREFIX + key], [now, limit, ttl, holder]))

    def release(self, key: str, holder: str) -> None:
        """See :meth:`FlowStore.release`."""
        self._call("zrem", PREFIX + key, holder)

    def claim(self, key: str, value: str, ttl: float, now: float) -> str | None:
        """See :meth:`FlowStore.claim`."""
        milliseconds = max(int(ttl * 1000), 1)
        kept = self._run("claim", _CLAIM, [PREFIX + key], [value, milliseconds])
        return None if kept is None else _text(kept)

    def unclaim(self, key: str, value: str) -> None:
        """See :meth:`FlowStore.unclaim`."""
        self._run("unclaim", _UNCLAIM, [PREFIX + key], [value])

    def get(self, key: str, now: float) -> str | None:
        """See :meth:`FlowStore.get`."""
        kept = self._call("get", PREFIX + key)
        return None if kept is None else _text(kept)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
