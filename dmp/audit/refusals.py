"""Refused calls in the audit trail without letting one peer flood it.

Every refusal is audited, but identical ones (same peer, same event: who, on whom, what,
status and reason) repeated within a window are not written one by one: the first
``burst`` of a window are recorded at once, the rest counted, and one event with their
``repeat_count`` is written when the window ends (and at shutdown). A person whose calls
were refused more than ``flood`` times in a window is answered RESOURCE_EXHAUSTED until
the window ends, before any other work. Services (nodes, the directory) are not slowed
down: the directory relays every person's calls.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dmp.audit.events import AuditEvent, EventType, outcome_for_status
from dmp.audit.log import AuditLog
from dmp.errors import DmpError, ResourceExhausted
from dmp.identity import Principal, Role

log = logging.getLogger("dmp.audit")

__all__ = ["RefusalTrail", "refusal_event"]

#: What may differ between two refusals that are otherwise identical.
_IGNORED_IN_KEY = ("event_date_time", "request_id")


def refusal_event(who: Principal | None, method: str, status: str, message: str) -> AuditEvent:
    """The event of a call refused before its action was known (no certificate, a revoked
    one, a flooding peer)."""
    return AuditEvent(
        event_type=EventType.REFUSED,
        event_outcome_indicator=outcome_for_status(status),
        status_code=status,
        active_participant_user_id=who.uri if who else "",
        active_participant_user_name=who.name if who else "",
        active_participant_role=(
            who.profession or (who.role.value if who.role is not Role.PRACTITIONER else "")
        )
        if who
        else "",
        request_id=uuid.uuid4().hex,
        detail=f"{method.rsplit('/', 1)[-1]}: {message}",
    )


def _key(peer: str, event: AuditEvent) -> tuple[Any, ...]:
    values: Mapping[str, Any] = event.to_dict()
    fields = tuple(
        (name, tuple(value) if isinstance(value, list) else value)
        for name, value in sorted(values.items())
        if name not in _IGNORED_IN_KEY
    )
    return (peer, *fields)


@dataclass
class _Seen:
    times: int = 0
    counted: int = 0
    last: AuditEvent | None = None


@dataclass
class _Window:
    seen: dict[tuple[Any, ...], _Seen] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)


class RefusalTrail:
    """Refusals of one service into its audit log, counted when they repeat."""

    def __init__(
        self, log_: AuditLog, *, window: float = 10.0, burst: int = 3, flood: int = 50
    ) -> None:
        if window <= 0 or burst < 1 or flood < 1:
            raise ValueError("window must be positive, burst and flood at least 1")
        self._log = log_
        self.window = window
        self._burst = burst
        self._flood = flood
        self._lock = threading.Lock()
        self._current = _Window()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, peer: Principal | None, event: AuditEvent) -> None:
        """Audit one refusal of a call from `peer` (the transport's certificate): at once
        if it is among the first identical ones of the window, else counted. Raises
        Unavailable if an event that must be written at once cannot be."""
        uri = peer.uri if peer else ""
        with self._lock:
            self._start()
            window = self._current
            window.refused[uri] = window.refused.get(uri, 0) + 1
            seen = window.seen.setdefault(_key(uri, event), _Seen())
            seen.times += 1
            if seen.times > self._burst:
                seen.counted += 1
                seen.last = event
                return
        self._log.record(event)

    def flooding(self, peer: Principal) -> DmpError | None:
        """The error to answer a person refused too often in this window, else None."""
        if peer.role in (Role.NODE, Role.DIRECTORY):
            return None
        with self._lock:
            refused = self._current.refused.get(peer.uri, 0)
        if refused < self._flood:
            return None
        return ResourceExhausted(
            f"calls from {peer.uri} were refused {self._flood} times within {self.window:g} s:"
            f" wait {self.window:g} s, then call again with a valid request",
            reason="REFUSAL_FLOOD",
        )

    def flush(self) -> None:
        """Write the counted events of the window that ends, and start a new one."""
        with self._lock:
            window, self._current = self._current, _Window()
        for seen in window.seen.values():
            if not seen.counted or seen.last is None:
                continue
            counted = AuditEvent.from_dict({**seen.last.to_dict(), "repeat_count": seen.counted})
            try:
                self._log.record(counted)
            except DmpError as exc:
                log.error(
                    "%d identical refusals could not be audited: %s", seen.counted, exc.message
                )

    def _start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="audit-refusals", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.window):
            self.flush()

    def close(self) -> None:
        """Stop the window thread and write what was counted (at shutdown)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.flush()
