"""Embedded discovery: nodes announce themselves to the directory, which checks them.

A node calls RegisterNode at start-up and then as a heartbeat. A new or changed address is
accepted only once a health check through the channel pinned to the node's region has
answered (directory/channels.py): the server there holds that region's certificate, not
merely some federation certificate. The directory asks every known node for its gRPC
health over mutual TLS at a fixed interval, in parallel, and routes only to nodes whose
last check answered SERVING. A node that answered a call of its NodeService since the
previous round is not asked that round: that answer came through the same pinned channel
from a node whose service is open (a frozen or handed-over node answers with an error),
so while views flow the checks cost nothing, and a node that stops answering is checked
again at the next round (noticed within two intervals instead of one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from directory.channels import (
    NODE_HEALTH_SERVICE,
    VERIFY_TIMEOUT,
    NodeChannels,
    identity_error,
)
from directory.models import NodeRow
from dmp.clock import now_us
from dmp.db import writer
from dmp.discovery import NodeRoute
from dmp.errors import PermissionDenied

log = logging.getLogger("dmp.directory.registry")

__all__ = ["HEARTBEAT_SECONDS", "NODE_HEALTH_SERVICE", "EmbeddedRegistry"]

HEARTBEAT_SECONDS = 5
#: How often the heartbeat of an unchanged node is written to the database (last_seen_us).
LAST_SEEN_WRITE_SECONDS = 60.0


class EmbeddedRegistry:
    """The Discovery of the embedded default: announced nodes, health-checked."""

    def __init__(
        self,
        engine: Engine,
        channels: NodeChannels,
        *,
        check_interval: float = 1.0,
        check_timeout: float = 1.0,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self._writer = writer(engine)
        self._engine = engine
        self._channels = channels
        self._interval = check_interval
        self._timeout = check_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._routes: dict[str, NodeRoute] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: dict[str, float] = {}

    def start(self) -> None:
        with Session(self._engine) as session:
            rows = session.execute(select(NodeRow.region, NodeRow.address)).all()
        with self._lock:
            self._routes = {
                region: NodeRoute(region, address, False, "not checked since the directory started")
                for region, address in rows
            }
        self.check_all()
        self._thread = threading.Thread(target=self._run, name="node-health", daemon=True)
        self._thread.start()

    def routes(self) -> dict[str, NodeRoute]:
        return self._routes

    def announce(self, region: str, address: str) -> None:
        """A node (authenticated as that region) says where it serves.

        Refused (PermissionDenied) when the server at `address` does not hold the region's
        certificate, (FailedPrecondition) when nothing answers there: the route stays as it
        was."""
        known = self._routes.get(region)
        if known is not None and known.address == address and known.healthy:
            if time.monotonic() - self._written.get(region, 0.0) < LAST_SEEN_WRITE_SECONDS:
                return  # a heartbeat of a node already routed to: no write (and no fsync)
        else:
            _, problem = self._channels.verify([(region, address)], VERIFY_TIMEOUT)[region, address]
            if problem is not None:
                log.warning("node %s announced %s, refused: %s", region, address, problem)
                raise problem
        self._written[region] = time.monotonic()
        with Session(self._writer) as session, session.begin():
            row = session.get(NodeRow, region)
            if row is None:
                session.add(NodeRow(region=region, address=address, last_seen_us=self._clock()))
            else:
                row.address = address
                row.last_seen_us = self._clock()
        with self._lock:
            old = self._routes.get(region)
            if old is not None and old.address != address:
                self._channels.forget(region, old.address)
            if old is None or old.address != address or not old.healthy:
                routes = dict(self._routes)
                routes[region] = NodeRoute(region, address, True)
                self._routes = routes
                log.info("node %s announced at %s", region, address)

    def check_all(self) -> None:
        """Ask every known node for its health, in parallel (but those that answered a
        call of their service since the last round); update the routes."""
        current = self._routes
        # A node that answered a call of its service within the last interval showed it
        # serves, through the same pinned channel: while views flow, no health calls.
        recent = time.monotonic() - self._interval
        request = health_pb2.HealthCheckRequest(service=NODE_HEALTH_SERVICE)
        calls = {
            region: self._channels.health(region, route.address).Check.future(
                request, timeout=self._timeout
            )
            for region, route in current.items()
            if not (route.healthy and self._channels.answered_since(region, route.address, recent))
        }
        results: dict[str, tuple[bool, str]] = {}
        for region, call in calls.items():
            try:
                answer = call.result()
                serving = answer.status == health_pb2.HealthCheckResponse.SERVING
                results[region] = (serving, "" if serving else "its node reports it is not serving")
            except grpc.RpcError as exc:
                if isinstance(
                    identity_error(region, current[region].address, exc), PermissionDenied
                ):
                    reason = f"the server at its address is not urn:dmp:node:{region}"
                else:
                    reason = f"its node did not answer its health check ({exc.code().name})"
                results[region] = (False, reason)
        with self._lock:
            routes = dict(self._routes)
            for region, (healthy, reason) in results.items():
                route = routes.get(region)
                if route is None or route.address != current[region].address:
                    continue  # re-announced meanwhile: the announcement wins
                if route.healthy != healthy:
                    log.warning(
                        "region %s %s", region, "back in service" if healthy else f"down: {reason}"
                    )
                routes[region] = NodeRoute(region, route.address, healthy, reason)
            self._routes = routes

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check_all()
            except Exception:  # the checker must outlive any single failure
                log.exception("health check round failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
