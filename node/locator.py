"""Delivers the locator outbox to the directory: what was committed is reported, with
retries, however long the directory is away. Reports carry absolute counts, so a report
delivered twice does no harm."""

from __future__ import annotations

import logging
import threading

import grpc

from dmp.clock import from_us
from dmp.v1 import directory_service_pb2 as pb
from dmp.v1 import directory_service_pb2_grpc
from node.store import RecordStore

log = logging.getLogger("dmp.node.locator")

MAX_BACKOFF = 5.0


class OutboxDelivery:
    def __init__(
        self, store: RecordStore, channel: grpc.Channel, *, retry_seconds: float = 0.2
    ) -> None:
        self._store = store
        self._stub = directory_service_pb2_grpc.DirectoryServiceStub(channel)
        self._retry = retry_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="locator-outbox", daemon=True)
        store.on_commit(self._wake.set)

    def start(self) -> None:
        self._thread.start()

    def deliver_once(self) -> int:
        """Deliver one batch; return how many outbox rows it delivered (0: outbox empty)."""
        seqs, summaries = self._store.pending_notifications()
        if not seqs:
            return 0
        if summaries:
            request = pb.ReportFragmentsRequest(
                fragments=[
                    pb.FragmentReport(
                        patient=s.traits.to_proto(),
                        record_count=s.count,
                        last_update=from_us(s.last_update_us),
                    )
                    for s in summaries
                ]
            )
            answer = self._stub.ReportFragments(request, timeout=10)
            for ins in answer.conflicting_ins:
                log.error(
                    "directory refused the fragment of INS %s: identity conflict kept for review",
                    ins,
                )
        # Exactly the rows read: one that committed since, even with a lower seq, stays.
        self._store.acknowledge(seqs)
        return len(seqs)

    def _run(self) -> None:
        backoff = self._retry
        failing = False
        while not self._stop.is_set():
            try:
                while self.deliver_once():
                    pass
                if failing:
                    log.info("directory reached again: outbox delivered")
                failing = False
                backoff = self._retry
                self._wake.wait(30)
            except grpc.RpcError as exc:
                if not failing:
                    log.warning("cannot report to the directory (%s): will retry", exc.code().name)
                failing = True
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
            except Exception:
                log.exception("outbox delivery failed: will retry")
                self._stop.wait(MAX_BACKOFF)
            self._wake.clear()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
