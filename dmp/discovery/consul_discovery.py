"""Consul discovery, the directory's side: follow the passing `dmp-node` instances of each
region (blocking queries, rate-limited) and route only those verified as that region's node.
The node's side (registration with a TTL check) and the shared Consul helpers are in
dmp/discovery/consul.py."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from dmp.discovery import NODE_SERVICE_NAME, NodeRoute
from dmp.discovery.consul import (
    _CONSUL_ERRORS,
    _GO_DURATION,
    _MAX_WAIT_SECONDS,
    DISCOVERY_HTTP_TIMEOUT,
    QUERY_BURST,
    QUERY_MIN_INTERVAL,
    _client,
    _duration_seconds,
)
from dmp.discovery.consul_routes import Verify, routes_from
from dmp.errors import InvalidArgument, Unavailable

log = logging.getLogger("dmp.discovery.consul")


class _TokenBucket:
    """Rate limit of the blocking-query loop: `burst` quick calls, then one per `interval`."""

    def __init__(self, burst: int, interval: float) -> None:
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._interval = interval
        self._last = time.monotonic()

    def take(self, stop: threading.Event) -> bool:
        """Wait for a token; False if `stop` was set meanwhile."""
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) / self._interval)
        self._last = now
        if self._tokens < 1.0:
            if stop.wait((1.0 - self._tokens) * self._interval):
                return False
            self._tokens = 1.0
            self._last = time.monotonic()
        self._tokens -= 1.0
        return not stop.is_set()


class ConsulDiscovery:
    """The directory's Discovery backed by Consul: passing `dmp-node` instances, by region.

    start() fetches once (an unreachable Consul is logged and gives no routes yet), then a
    daemon thread follows changes with blocking queries on
    /v1/health/service/dmp-node?passing=1. Only instances whose checks all pass are routed.
    When Consul stops answering, the last known routes are kept (one warning per outage) and
    the query is retried every `retry_seconds`.

    `token` is the ACL token (needs `service:read` on `dmp-node` and `node:read`); when
    given it is passed to every call, so it wins over `CONSUL_HTTP_TOKEN`.

    Anyone with a Consul token can register `dmp-node` for any region: with `verify` (the
    directory passes one), an instance is routed only once the server at its address has
    answered as that region's node (see consul_routes.py).
    """

    def __init__(
        self,
        consul_url: str,
        *,
        token: str | None = None,
        wait: str = "30s",
        retry_seconds: float = 1.0,
        verify: Verify | None = None,
    ) -> None:
        wait_seconds = _duration_seconds(wait) if _GO_DURATION.match(wait) else 0.0
        if not 0 < wait_seconds <= _MAX_WAIT_SECONDS:
            raise InvalidArgument(
                f"invalid Consul wait {wait!r}: expected a duration up to 10m such as '30s'"
            )
        if not retry_seconds > 0:
            raise InvalidArgument(f"retry_seconds must be positive, got {retry_seconds!r}")
        self._url = consul_url
        self._token = token or None
        self._wait = wait
        self._retry = float(retry_seconds)
        self._client = _client(consul_url, self._token, DISCOVERY_HTTP_TIMEOUT)
        self._verify = verify
        self._verified: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._routes: Mapping[str, NodeRoute] = {}
        self._routes_index = 0
        self._skipped: frozenset[str] = frozenset()
        self._index = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._outage = False

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        try:
            self._index = max(self._fetch_and_publish(0, force=True), 1)
        except Unavailable as exc:
            self._outage = True
            log.warning(
                "%s; starting with no routes, retrying every %.3gs", exc.message, self._retry
            )
        self._thread = threading.Thread(target=self._run, name="consul-discovery", daemon=True)
        self._thread.start()

    def routes(self) -> dict[str, NodeRoute]:
        with self._lock:
            return dict(self._routes)

    def refresh(self) -> None:
        """Fetch the passing nodes now (non-blocking query); Unavailable if Consul is down."""
        self._fetch_and_publish(0, force=False)

    def close(self) -> None:
        """Stop following Consul. Returns within about two seconds; the thread is a daemon."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    # -- internals ---------------------------------------------------------------------------

    def _run(self) -> None:
        # The rate limit paces answered queries; failed ones are paced by retry_seconds.
        bucket = _TokenBucket(QUERY_BURST, QUERY_MIN_INTERVAL)
        answered = True
        while not self._stop.is_set():
            if answered and not bucket.take(self._stop):
                return
            answered = False
            try:
                self._follow_once()
                answered = True
            except Unavailable as exc:
                if not self._outage:
                    self._outage = True
                    log.warning(
                        "%s; keeping the last known routes (%s), retrying every %.3gs",
                        exc.message,
                        ", ".join(sorted(self.routes())) or "none",
                        self._retry,
                    )
                if self._stop.wait(self._retry):
                    return
            except Exception:  # the thread must survive anything: log and keep trying
                log.exception("unexpected error while following Consul at %s", self._url)
                if self._stop.wait(self._retry):
                    return

    def _follow_once(self) -> None:
        previous = self._index
        index = self._fetch_and_publish(previous, force=False, blocking=True)
        if self._outage:
            self._outage = False
            log.info("Consul at %s answers again", self._url)
        if index < previous:
            # Consul's advice: an index that goes backwards (restored snapshot, restarted
            # agent) restarts the loop from 0, with a non-blocking query.
            log.info("Consul index went back from %d to %d: resetting", previous, index)
            self._index = 0
        else:
            # Consul's advice: never block on index 0, which would answer at once.
            self._index = max(index, 1)

    def _fetch_and_publish(self, index: int, *, force: bool, blocking: bool = False) -> int:
        try:
            raw_index, entries = self._client.health.service(
                NODE_SERVICE_NAME,
                index=str(index) if blocking and index > 0 else None,
                wait=self._wait,
                passing=True,
                token=self._token,
            )
            new_index = int(raw_index)
        except OSError as exc:
            raise Unavailable(
                f"Consul at {self._url} does not answer ({type(exc).__name__})"
            ) from None
        except _CONSUL_ERRORS as exc:
            raise Unavailable(f"Consul at {self._url} answered an error: {exc}") from None
        if self._stop.is_set():
            return new_index
        routes, skipped = routes_from(entries, self._verify, self._verified)
        with self._lock:
            backwards = blocking and new_index < index
            if not (force or backwards) and new_index < self._routes_index:
                return new_index  # an older answer than the one published (refresh race)
            changed = routes != self._routes
            self._routes = routes
            self._routes_index = new_index
            report_skipped = skipped != self._skipped
            self._skipped = skipped
        if changed:
            log.info(
                "Consul routes: %s",
                ", ".join(f"{r}={route.address}" for r, route in sorted(routes.items())) or "none",
            )
        if report_skipped and skipped:
            log.warning(
                "Consul instances of %s not routed: %s",
                NODE_SERVICE_NAME,
                "; ".join(sorted(skipped)),
            )
        return new_index
