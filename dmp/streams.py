"""Streams within limits, so that idle or slow streams never starve unary calls.

A synchronous gRPC server gives each call a worker thread for as long as it runs; a stream
(health Watch, reflection, IngestRecords, content reads) can run for as long as its peer
keeps it open. The server's pool has threads for unary calls plus one for every stream
this gate admits, and no more streams are admitted than that:

- per class of peer: patients, practitioners and services (nodes, the directory) each have
  a total; patients and practitioners also a limit per certificate;
- a stream beyond a limit is answered RESOURCE_EXHAUSTED at once, saying which limit;
- a person's stream that waits on its peer (for the next request message, for a response
  to be taken, or on a health Watch with nothing to report) longer than ``idle_timeout``
  is closed with RESOURCE_EXHAUSTED. Services' streams are not timed: the directory holds
  one health Watch on each node channel for as long as it runs;
- a unary call also holds a thread while it waits for its request message, which a peer
  may hold back: the server reads it as the first message of a stream, so that calls
  waiting for their request are admitted and timed the same way (with limits of their
  own; a service's are not limited).

We measured a synchronous server with 32 workers stopped by about 40 idle streams; an
asyncio server would hold no thread per stream but means rewriting every servicer, while
these limits keep the servicers as they are and bound what streams can take.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from dmp.errors import InvalidArgument, ResourceExhausted
from dmp.identity import Principal, Role

log = logging.getLogger("dmp.streams")

__all__ = ["StreamGate", "StreamLimits"]

#: Methods whose handler waits on nothing but time: waiting for their next message is idle.
IDLE_BY_NATURE = frozenset({"/grpc.health.v1.Health/Watch"})


@dataclass(frozen=True)
class StreamLimits:
    """How many streams a server holds open at once, by class of peer.

    Class totals are large beside the limits per person, so that it takes many
    certificates to deny one class its streams; each needs a thread while open."""

    per_patient: int = 2
    patients: int = 32
    per_practitioner: int = 4
    practitioners: int = 64
    services: int = 32
    #: Unary calls of one person waiting for their request message (each class of people
    #: also has as many of these in all as it has streams; services are not limited).
    waiting_per_person: int = 8
    #: Seconds a person's stream may wait on its peer before it is closed.
    idle_timeout: float = 60.0

    @property
    def total(self) -> int:
        """Threads that admitted streams and calls waiting for their request may hold."""
        return 2 * (self.patients + self.practitioners) + self.services

    def of(self, role: Role) -> tuple[str, int, int | None]:
        """The class of a peer: its name, its total and its limit per certificate."""
        if role is Role.PATIENT:
            return "patients", self.patients, self.per_patient
        if role is Role.PRACTITIONER:
            return "practitioners", self.practitioners, self.per_practitioner
        return "services", self.services, None


class Stream:
    """One admitted stream: whether it waits on its peer, and since when."""

    __slots__ = ("_context", "closed", "idle_by_nature", "pending", "timed", "waiting_since")

    def __init__(
        self, context: grpc.ServicerContext, timed: bool, idle_by_nature: bool, pending: bool
    ) -> None:
        self._context = context
        self.timed = timed
        self.idle_by_nature = idle_by_nature
        self.pending = pending
        self.waiting_since: float | None = None
        self.closed = ""

    def first(self, inner: Iterator[Any]) -> Any:
        """The call's one request message (the wait for it timed)."""
        for item in self.requests(inner):
            return item
        raise InvalidArgument("the call carried no request message: send exactly one")

    def requests(self, inner: Iterator[Any]) -> Iterator[Any]:
        """The request messages, each wait for one timed."""
        while True:
            self.waiting_since = time.monotonic()
            try:
                item = next(inner)
            except StopIteration:
                return
            except grpc.RpcError:
                self._raise_if_closed()
                raise
            finally:
                self.waiting_since = None
            self._raise_if_closed()
            yield item

    def responses(self, inner: Iterator[Any]) -> Iterator[Any]:
        """The response messages, each send timed (and each wait, for a health Watch)."""
        while True:
            if self.idle_by_nature:
                self.waiting_since = time.monotonic()
            try:
                item = next(inner)
            except StopIteration:
                break
            finally:
                self.waiting_since = None
            self._raise_if_closed()
            self.waiting_since = time.monotonic()
            yield item  # the server resumes us once the peer has taken the message
            self.waiting_since = None
        self._raise_if_closed()

    def idle_for(self, now: float) -> float:
        since = self.waiting_since
        return 0.0 if since is None else now - since

    def _raise_if_closed(self) -> None:
        if self.closed:
            raise ResourceExhausted(self.closed, reason="STREAM_IDLE")

    def close(self, message: str) -> None:
        """End the call with RESOURCE_EXHAUSTED and `message` (from the watchdog)."""
        self.closed = message
        call = getattr(getattr(self._context, "_rpc_event", None), "call", None)
        try:
            # grpcio's ServicerContext.cancel() would tell the peer only CANCELLED: end the
            # call with our status where the runtime lets us, else cancel it.
            call.cancel(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message)  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            self._context.cancel()


class StreamGate:
    """Admits streams within :class:`StreamLimits` and closes people's idle ones."""

    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits or StreamLimits()
        self._lock = threading.Lock()
        self._by_class: dict[str, int] = {}
        self._by_peer: dict[str, int] = {}
        self._timed: set[Stream] = set()
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()

    @contextmanager
    def admit(
        self,
        principal: Principal,
        context: grpc.ServicerContext,
        method: str,
        *,
        pending: bool = False,
    ) -> Iterator[Stream]:
        """Hold a stream slot for the duration of the call, or raise ResourceExhausted.
        With ``pending``, a slot of a unary call waiting for its request message (which
        normally comes with the call: a call that holds it back holds a thread)."""
        name, total, per_peer = self.limits.of(principal.role)
        if pending:
            if per_peer is None:  # a service's call: trusted, not counted
                yield Stream(context, False, False, True)
                return
            name = f"{name} waiting"
            per_peer = self.limits.waiting_per_person
        peer = f"{principal.uri} waiting" if pending else principal.uri
        with self._lock:
            open_in_class = self._by_class.get(name, 0)
            open_by_peer = self._by_peer.get(peer, 0)
            what = "calls waiting for their request" if pending else "open streams"
            if per_peer is not None and open_by_peer >= per_peer:
                raise ResourceExhausted(
                    f"too many {what} from {principal.uri}: at most {per_peer} at once;"
                    " close one before opening another",
                    reason="STREAM_LIMIT",
                )
            if open_in_class >= total:
                raise ResourceExhausted(
                    f"this server holds as many {what} from {name.split()[0]} as it accepts"
                    f" ({total}): retry later",
                    reason="STREAM_LIMIT",
                )
            self._by_class[name] = open_in_class + 1
            self._by_peer[peer] = open_by_peer + 1
            stream = Stream(context, per_peer is not None, method in IDLE_BY_NATURE, pending)
            if stream.timed:
                self._timed.add(stream)
                self._start_watchdog()
        try:
            yield stream
        finally:
            with self._lock:
                self._by_class[name] -= 1
                self._by_peer[peer] -= 1
                if not self._by_peer[peer]:
                    del self._by_peer[peer]
                self._timed.discard(stream)

    def open_streams(self) -> int:
        with self._lock:
            return sum(self._by_class.values())

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="stream-idle", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        timeout = self.limits.idle_timeout
        tick = max(0.05, min(1.0, timeout / 5))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                idle = [s for s in self._timed if not s.closed and s.idle_for(now) > timeout]
            for stream in idle:
                stream.close(
                    f"call closed: no request message within {timeout:g} s; send the request"
                    " with the call"
                    if stream.pending
                    else f"stream closed: idle for more than {timeout:g} s waiting on the caller;"
                    " open a stream when there is something to send, and read what it answers"
                )

    def close(self) -> None:
        self._stop.set()
