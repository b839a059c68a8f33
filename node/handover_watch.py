"""The serving predecessor's side of a hand-over: what `complete` and `abort` change in it.

`dmp node handover complete` writes ``freezing`` in the node's database (it may run in
another process, or while the node is down); the serving node sees it within a fraction of
a second and freezes: its gate turns every call away with UNAVAILABLE, reason
REGION_MOVING and a retry delay (nothing was written: a retry reaches the successor once
it is in charge), the calls already admitted finish, the node stops announcing itself and
delivering its locator outbox (the successor takes both over), writes the counted refusals
and a last signed audit checkpoint, says NOT_SERVING, and records ``frozen`` with its final
record and audit sequence and audit root. Once the successor confirmed (``handed_over``)
every call is told REGION_MOVED, with the successor's address. An abort before that
reopens the gate and starts announcing and delivering again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from grpc_health.v1 import health_pb2
from sqlalchemy import Engine, Table, func, select

from dmp.audit.calls import Auditor
from dmp.audit.log import AuditLog
from dmp.errors import Unavailable
from dmp.server import FederationServer
from node.handover_state import FREEZING, FROZEN, HANDED_OVER, PREDECESSOR, Handover, move, read
from node.models import RecordRow, audit_checkpoints

log = logging.getLogger("dmp.node.handover")

#: How often the serving node looks at its hand-over state while one runs, and otherwise.
POLL_SECONDS = 0.1
IDLE_POLL_SECONDS = 1.0
#: Seconds the calls in flight at the freeze have to finish before they are cancelled.
DRAIN_SECONDS = 3.0
#: Seconds a caller is told to wait before retrying while the region moves.
RETRY_SECONDS = 0.5
_RECORDS: Table = RecordRow.__table__  # type: ignore[assignment]


def moving(region: str) -> Unavailable:
    return Unavailable(
        f"region {region} is being handed over to its successor host: nothing was written;"
        f" retry in {RETRY_SECONDS:g} s",
        reason="REGION_MOVING",
        retry_after=RETRY_SECONDS,
    )


def moved(region: str, successor: str) -> Unavailable:
    where = f" at {successor}" if successor else ""
    return Unavailable(
        f"region {region} was handed over to its successor node{where}: nothing was written"
        " here; call the successor (the directory routes there)",
        reason="REGION_MOVED",
        metadata={"successor": successor} if successor else {},
        retry_after=0.1,
    )


class Background:
    """What a serving node runs beside its calls that a frozen one must not: announcing
    itself, delivering its outbox. `start` makes them anew (after an abort)."""

    def __init__(self, start: Callable[[], Sequence[Callable[[], None]]]) -> None:
        self._start = start
        self._stops: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if not self._stops:
                self._stops = list(self._start())

    def stop(self) -> None:
        with self._lock:
            stops, self._stops = self._stops, []
        for stop in stops:
            stop()


class HandoverWatch:
    def __init__(
        self,
        engine: Engine,
        region: str,
        server: FederationServer,
        audit_log: AuditLog,
        auditor: Auditor,
        background: Background,
        services: Sequence[str],
    ) -> None:
        self._engine = engine
        self._region = region
        self._server = server
        self._audit = audit_log
        self._auditor = auditor
        self._background = background
        self._services = services
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="handover-watch", daemon=True)
        self.state: str | None = None

    def prepare(self) -> bool:
        """Before serving: close the gate of a frozen or handed-over node; whether the
        node may start its background work."""
        handover = read(self._engine)
        self._follow(handover, starting=True)
        return self.state is None

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        wait = POLL_SECONDS
        while not self._stop.wait(wait):
            try:
                handover = read(self._engine)
                self._follow(handover)
            except Exception:
                log.exception("hand-over: cannot read this node's hand-over state; retrying")
                continue
            # Without a hand-over, a look a second is enough: `start` comes before `complete`.
            wait = POLL_SECONDS if handover is not None else IDLE_POLL_SECONDS

    def _follow(self, handover: Handover | None, *, starting: bool = False) -> None:
        state = handover.state if handover and handover.role == PREDECESSOR else None
        if state == FREEZING:
            self._freeze()
        elif state == FROZEN and self.state != FROZEN:
            self._close(moving(self._region))
            self.state = FROZEN
        elif state == HANDED_OVER and self.state != HANDED_OVER:
            assert handover is not None
            self._close(moved(self._region, handover.peer_address))
            self.state = HANDED_OVER
        elif state not in (FREEZING, FROZEN, HANDED_OVER) and self.state is not None:
            log.warning("hand-over of region %s aborted: serving it again", self._region)
            self._server.gate.open()
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
            if not starting:
                self._background.start()
            self.state = None

    def _close(self, error: Unavailable) -> None:
        self._server.gate.close(error)
        self._background.stop()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *self._services):
            self._server.health.set(name, status)

    def _freeze(self) -> None:
        log.warning("hand-over of region %s: no more calls accepted (freezing)", self._region)
        self._server.gate.close(moving(self._region))
        self.state = FREEZING  # an abort from here reopens
        if not self._server.gate.drain(timeout=DRAIN_SECONDS):
            cancelled = self._server.gate.cancel_in_flight()
            log.warning(
                "hand-over: cancelled %d call(s) still running after %g s (their clients"
                " retry: what they committed is handed over)",
                cancelled,
                DRAIN_SECONDS,
            )
            while not self._server.gate.drain(timeout=5.0):
                log.warning("hand-over: waiting for cancelled calls to end")
        self._background.stop()
        if self._auditor.refusals is not None:
            self._auditor.refusals.flush()
        self._audit.checkpoint()
        with self._engine.connect() as conn:
            last = conn.execute(
                select(audit_checkpoints.c.tree_size, audit_checkpoints.c.root_hash)
                .order_by(audit_checkpoints.c.tree_size.desc())
                .limit(1)
            ).first()
            record_seq = int(conn.execute(select(func.max(_RECORDS.c.seq))).scalar() or 0)
        size, root = (int(last[0]), bytes(last[1])) if last is not None else (0, b"")
        if size != self._audit.size():
            raise RuntimeError("the last audit checkpoint does not cover the whole log")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if move(
            self._engine,
            {FREEZING},
            state=FROZEN,
            final_record_seq=record_seq,
            final_audit_seq=size,
            final_root_hash=root,
        ):
            self.state = FROZEN
            log.warning(
                "hand-over of region %s: frozen at record %d, audit %d; the successor takes"
                " the last changes",
                self._region,
                record_seq,
                size,
            )
