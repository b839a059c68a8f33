"""One mutual-TLS channel per node address, opened once and reused by every call."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2_grpc

from dmp.pki import Credentials
from dmp.tls import secure_channel
from dmp.v1 import node_service_pb2_grpc


class NodeChannels:
    """Channels to nodes keyed by address: no TLS handshake per request."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
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
        return entry

    def node(self, address: str) -> node_service_pb2_grpc.NodeServiceStub:
        return self._entry(address)[1]

    def health(self, address: str) -> health_pb2_grpc.HealthStub:
        return self._entry(address)[2]

    def forget(self, address: str) -> None:
        """Close the channel of an address no node uses any more."""
        with self._lock:
            entry = self._channels.pop(address, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        with self._lock:
            entries = list(self._channels.values())
            self._channels.clear()
        for channel, _, _ in entries:
            channel.close()
