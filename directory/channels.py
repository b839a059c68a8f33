"""One mutual-TLS channel per (region, node address), opened once and reused by every call.

A channel to region R's address checks, at every TLS handshake, that the server holds node
R's certificate: its target name is node_tls_name(R), a DNS name only node R's certificate
carries, so standard host name verification refuses any other server at that address (a
node announcing another node's address, or a stale route now answered by someone else).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dmp.errors import DmpError, FailedPrecondition, PermissionDenied
from dmp.pki import Credentials, node_tls_name
from dmp.tls import secure_channel
from dmp.v1 import node_service_pb2_grpc

#: The health service a node reports on, checked by the directory.
NODE_HEALTH_SERVICE = "dmp.v1.NodeService"
#: Held open on every node channel (see NodeChannels).
_WATCH = health_pb2.HealthCheckRequest(service=NODE_HEALTH_SERVICE)
#: Seconds a verification waits for a node's answer.
VERIFY_TIMEOUT = 2.0
#: What grpc's TLS stack says when the server's certificate is not the one asked for.
_TLS_REFUSALS = ("hostname verification", "peer name", "certificate", "handshake", "ssl")

_Key = tuple[str, str]
_Entry = tuple[grpc.Channel, node_service_pb2_grpc.NodeServiceStub, health_pb2_grpc.HealthStub]


def identity_error(region: str, address: str, exc: grpc.RpcError) -> DmpError:
    """Why `address` was not verified as node `region`, for the operator who can fix it."""
    name = node_tls_name(region)
    details = exc.details() or ""
    if any(word in details.lower() for word in _TLS_REFUSALS):
        return PermissionDenied(
            f"the server at {address} does not hold the certificate of urn:dmp:node:{region}"
            f" (DNS name {name}): a node registers only its own address; if it is this"
            f" region's node, its certificate predates region names: reissue it with"
            f" `dmp pki issue node --region {region}`"
        )
    return FailedPrecondition(
        f"{address} does not answer as urn:dmp:node:{region} ({exc.code().name}): check that"
        " the node listens there (its --listen or --advertise address) and that the directory"
        " can reach it"
    )


class NodeChannels:
    """Channels to nodes keyed by (region, address): no TLS handshake per request.

    Each channel holds one long call open, a health Watch: grpcio starts a thread for a
    channel's future calls whenever it has none in flight and ends it when the last one
    completes, so without it every view would start and stop a thread per node.
    """

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._watches: dict[_Key, Any] = {}
        self._lock = threading.Lock()
        self._channels: dict[_Key, _Entry] = {}
        #: When each node last answered a call of its service (monotonic seconds).
        self._answered: dict[_Key, float] = {}

    def _entry(self, region: str, address: str) -> _Entry:
        key = (region, address)
        entry = self._channels.get(key)
        if entry is None:
            with self._lock:
                entry = self._channels.get(key)
                if entry is None:
                    channel = secure_channel(
                        address, self._credentials, server_name=node_tls_name(region)
                    )
                    entry = (
                        channel,
                        node_service_pb2_grpc.NodeServiceStub(channel),
                        health_pb2_grpc.HealthStub(channel),
                    )
                    self._channels[key] = entry
                    self._watches[key] = entry[2].Watch(_WATCH)
        return entry

    def node(self, region: str, address: str) -> node_service_pb2_grpc.NodeServiceStub:
        return self._entry(region, address)[1]

    def channel(self, region: str, address: str) -> grpc.Channel:
        """The channel itself, for the node's other services (its witness)."""
        return self._entry(region, address)[0]

    def health(self, region: str, address: str) -> health_pb2_grpc.HealthStub:
        return self._entry(region, address)[2]

    def verify(
        self, candidates: Iterable[tuple[str, str]], timeout: float
    ) -> dict[tuple[str, str], tuple[bool, DmpError | None]]:
        """Ask each (region, address) for its health, in parallel, through the channel
        pinned to that region: per candidate, (serving, why it is not node R).

        Any answer proves the server holds node R's certificate (the handshake checked it);
        an error names what failed (PermissionDenied: another identity answers there,
        FailedPrecondition: nothing answers), and the channel is closed."""
        request = health_pb2.HealthCheckRequest(service=NODE_HEALTH_SERVICE)
        calls = {
            (region, address): self.health(region, address).Check.future(request, timeout=timeout)
            for region, address in candidates
        }
        results: dict[tuple[str, str], tuple[bool, DmpError | None]] = {}
        for (region, address), call in calls.items():
            try:
                answer = call.result()
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    results[region, address] = (False, identity_error(region, address, exc))
                    self.forget(region, address)
                else:  # the handshake passed: it is node R, answering an error
                    results[region, address] = (False, None)
                continue
            serving = answer.status == health_pb2.HealthCheckResponse.SERVING
            results[region, address] = (serving, None)
        return results

    def problems(self, candidates: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        """verify() as discovery wants it: per candidate, why it is not node R, or None."""
        return {
            key: (problem.message if problem is not None else None)
            for key, (_, problem) in self.verify(candidates, VERIFY_TIMEOUT).items()
        }

    def answered(self, region: str, address: str) -> None:
        """The node at (region, address) answered a call of its service, with success: as
        good as a health check answering SERVING (a node whose service is closed, frozen
        or handed over, answers its calls with an error)."""
        self._answered[region, address] = time.monotonic()

    def answered_since(self, region: str, address: str, since: float) -> bool:
        """Whether it answered a call with success at or after `since` (monotonic)."""
        return self._answered.get((region, address), -math.inf) >= since

    def forget(self, region: str, address: str) -> None:
        """Close the channel of a (region, address) no route uses any more."""
        self._answered.pop((region, address), None)
        with self._lock:
            entry = self._channels.pop((region, address), None)
            watch = self._watches.pop((region, address), None)
        if watch is not None:
            watch.cancel()
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        with self._lock:
            entries = list(self._channels.values())
            self._channels.clear()
            watches = list(self._watches.values())
            self._watches.clear()
        for watch in watches:
            watch.cancel()
        for channel, _, _ in entries:
            channel.close()
