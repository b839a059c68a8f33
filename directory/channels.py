"""One mutual-TLS channel per node address, opened once and reused by every call."""

from __future__ import annotations

import threading
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dmp.pki import Credentials
from dmp.tls import secure_channel
from dmp.v1 import node_service_pb2_grpc

#: Held open on every node channel (see NodeChannels).
_WATCH = health_pb2.HealthCheckRequest(service="dmp.v1.NodeService")


class NodeChannels:
    """Channels to nodes keyed by address: no TLS handshake per request.

    Each channel holds one long call open, a health Watch: grpcio starts a thread for a
    channel's future calls whenever it has none in flight and ends it when the last one
    completes, so without it every view would start and stop a thread per node.
    """

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._watches: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._channels: dict[
            str,
            tuple[grpc.Channel, node_service_pb2_grpc.NodeServiceStub, health_pb2_grpc.HealthStub],
        ] = {}

    def _entry(
        self, address: str
    ) -> tuple[grpc.Channel, node_service_pb2_grpc.NodeServiceStub, health_pb2_grpc.HealthStub]:
        entry = self._channels.get(address)
        if entry is None:
            with self._lock:
                entry = self._channels.get(address)
                if entry is None:
                    channel = secure_channel(address, self._credentials)
                    entry = (
                        channel,
                        node_service_pb2_grpc.NodeServiceStub(channel),
                        health_pb2_grpc.HealthStub(channel),
                    )
                    self._channels[address] = entry
                    self._watches[address] = entry[2].Watch(_WATCH)
        return entry

    def channel(self, address: str) -> grpc.Channel:
        """The channel itself, for the node's other services (its witness)."""
        return self._entry(address)[0]

    def node(self, address: str) -> node_service_pb2_grpc.NodeServiceStub:
        return self._entry(address)[1]

    def health(self, address: str) -> health_pb2_grpc.HealthStub:
        return self._entry(address)[2]

    def forget(self, address: str) -> None:
        """Close the channel of an address no node uses any more."""
        with self._lock:
            entry = self._channels.pop(address, None)
            watch = self._watches.pop(address, None)
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
