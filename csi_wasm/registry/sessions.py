"""HTTP sessions per registry: few, bounded, and with connections that report their sockets to the watchdog.

A session (and its pooled keep-alive connections) is kept per registry host, so a
cold pull reuses one connection for its manifest, token and blob requests. The
cache is bounded: at most ``max_sessions`` registries, the least recently used
one is closed first, and a session idle for ``idle_seconds`` is closed at the next
use of the pool. (Every distinct registry host used to keep a session and a
socket for ever: at about 1,000 hosts the driver ran out of file descriptors.)

A session taken out of the pool is closed at once, and again when each request
that had already got it (``SessionPool.use``) is done: a request on a session
closed under it opens a new connection pool, which that second close closes. A
response still being read is unaffected: urllib3 closes its connection when it is
returned to a closed pool.
"""

from __future__ import annotations

import collections
import contextlib
import http.cookiejar
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.poolmanager

from csi_wasm.registry.watchdog import WatchSlot

MAX_SESSIONS = 32
IDLE_SECONDS = 60.0
CONNECTIONS_PER_HOST = 4


class _Watched:
    """Mixed into urllib3's connections: every socket a request runs on is attached to the exchange's watch."""

    _watch_slot: WatchSlot

    def _new_conn(self) -> Any:
        sock = super()._new_conn()  # type: ignore[misc]
        self._watch_slot.attach(sock)  # before TLS: a dripped handshake is bounded too
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        sock = getattr(self, "sock", None)
        if sock is not None:  # a kept-alive connection, reused
            self._watch_slot.attach(sock)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    def __init__(self, *args: Any, watch_slot: WatchSlot, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch_slot = watch_slot


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    def __init__(self, *args: Any, watch_slot: WatchSlot, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch_slot = watch_slot


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _PoolManager(urllib3.poolmanager.PoolManager):
    def __init__(self, watch_slot: WatchSlot, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        self._watch_slot = watch_slot
        # urllib3 2 drops evicted and cleared pools without closing them: their idle connections close
        # only when the pool is garbage-collected, which a response kept by a traceback can put off until
        # the cyclic collector runs. Closing a session must close its sockets now.
        self.pools.dispose_func = _close_pool

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> urllib3.connectionpool.HTTPConnectionPool:
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        context["watch_slot"] = self._watch_slot  # handed to each connection the pool makes
        return super()._new_pool(scheme, host, port, context)


def _close_pool(pool: urllib3.connectionpool.HTTPConnectionPool) -> None:
    pool.close()


class _Adapter(requests.adapters.HTTPAdapter):
    def __init__(self, watch_slot: WatchSlot) -> None:
        self._watch_slot = watch_slot
        super().__init__(pool_connections=1, pool_maxsize=CONNECTIONS_PER_HOST)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        self._pool_connections, self._pool_maxsize, self._pool_block = connections, maxsize, block
        self.poolmanager = _PoolManager(
            self._watch_slot, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs
        )


def new_session(watch_slot: WatchSlot) -> requests.Session:
    session = requests.Session()
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))  # registries get none back
    adapter = _Adapter(watch_slot)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass
class _Held:
    session: requests.Session
    used: float
    retired: bool = False  # taken out of the pool and closed; closed again by each user when done


class SessionPool:
    def __init__(
        self,
        watch_slot: WatchSlot,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = MAX_SESSIONS,
        idle_seconds: float = IDLE_SECONDS,
    ) -> None:
        self._watch_slot = watch_slot
        self._clock = clock
        self._max_sessions = max(1, max_sessions)
        self._idle_seconds = idle_seconds
        self._sessions: collections.OrderedDict[tuple[str, str, bool | str], _Held] = collections.OrderedDict()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, scheme: str, host: str, verify: bool | str) -> Iterator[requests.Session]:
        """The session for this registry, for one request."""
        key = (scheme, host, verify)
        now = self._clock()
        with self._lock:
            retiring = [self._sessions.pop(k) for k, old in list(self._sessions.items())
                        if k != key and now - old.used > self._idle_seconds]  # fmt: skip
            held = self._sessions.pop(key, None) or _Held(new_session(self._watch_slot), now)
            held.used = now
            self._sessions[key] = held  # most recently used last
            while len(self._sessions) > self._max_sessions:
                retiring.append(self._sessions.popitem(last=False)[1])
        _retire(retiring)
        try:
            yield held.session
        finally:
            if held.retired:  # closed under this request, which may have opened a new pool on it
                held.session.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        with self._lock:
            retiring = list(self._sessions.values())
            self._sessions.clear()
        _retire(retiring)


def _retire(sessions: list[_Held]) -> None:
    for held in sessions:
        held.retired = True
        held.session.close()
