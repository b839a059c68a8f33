"""The node's side of embedded discovery: announce its address to the directory, repeat
as a heartbeat, and keep trying while the directory is away."""

from __future__ import annotations

import logging
import threading

import grpc

from dmp.v1 import directory_service_pb2 as pb
from dmp.v1 import directory_service_pb2_grpc

log = logging.getLogger("dmp.discovery.embedded")


class EmbeddedAnnouncer:
    def __init__(self, channel: grpc.Channel, address: str, *, retry_seconds: float = 1.0) -> None:
        self._stub = directory_service_pb2_grpc.DirectoryServiceStub(channel)
        self._address = address
        self._retry = retry_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="announcer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def announce_once(self) -> float:
        """Announce now; return the seconds until the next heartbeat."""
        answer: pb.RegisterNodeResponse = self._stub.RegisterNode(
            pb.RegisterNodeRequest(address=self._address), timeout=5
        )
        return max(0.5, answer.heartbeat_seconds * 0.5)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                wait = self.announce_once()
                if failing:
                    log.info("directory reached again: announced %s", self._address)
                failing = False
            except grpc.RpcError as exc:
                if not failing:
                    log.warning(
                        "cannot announce %s to the directory (%s: %s): retrying",
                        self._address,
                        exc.code().name,
                        exc.details(),
                    )
                failing = True
                wait = self._retry
            self._stop.wait(wait)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
