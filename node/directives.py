"""Where a node gets a patient's directives: signed by the patient, from the directory.

Relayed calls carry the directory's current signed set (DIRECTIVES_KEY); other calls use
a cache refreshed from the directory after at most STALENESS_SECONDS. Every set is
verified against the patient's signature and never replaced by an older version, so the
directory can neither forge a directive nor roll back one this node has seen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import grpc
from google.protobuf.message import DecodeError

from dmp.directives import (
    DIRECTIVES_KEY,
    NO_DIRECTIVES_KEY,
    PatientDirectives,
    verify_directives,
)
from dmp.errors import InvalidArgument, Unavailable
from dmp.signing import SignatureVerifier
from dmp.v1 import access_pb2, directory_service_pb2, directory_service_pb2_grpc

log = logging.getLogger("dmp.node.directives")

STALENESS_SECONDS = 5.0


class DirectiveCache:
    def __init__(
        self,
        signatures: SignatureVerifier,
        channel: grpc.Channel | None,
        *,
        staleness: float = STALENESS_SECONDS,
    ) -> None:
        self._signatures = signatures
        self._stub = directory_service_pb2_grpc.DirectoryServiceStub(channel) if channel else None
        self._staleness = staleness
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[PatientDirectives, float]] = {}
        # Signed sets already verified, by signature: each view relays the same set, and a
        # signature check per call would cost more than the rest of the access check.
        self._verified: dict[bytes, tuple[PatientDirectives, float]] = {}
        # The same verdicts by the relayed bytes themselves: a view relays the same bytes to
        # every node, and each call parsed them again before looking the signature up.
        self._relayed: dict[bytes, tuple[PatientDirectives, float]] = {}

    def get(
        self,
        patient_ins: str,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        *,
        fail_closed: bool = True,
    ) -> PatientDirectives:
        """The patient's directives, no older than the staleness bound. When the directory
        does not answer, reads fail (fail_closed); writes go on with what is known, so that
        care is not stopped and nothing is disclosed."""
        raw = _carried_bytes(metadata)
        carried = None if raw is None else self._known_bytes(raw, patient_ins)
        if carried is not None:
            return self._keep(patient_ins, carried)
        carried_set = None if raw is None else _parsed(raw)
        if carried_set is not None and raw is not None:
            try:
                directives = self._verify(carried_set, patient_ins)
            except Exception as exc:  # a bad relayed set is ignored: fetch instead
                log.warning("ignoring directives relayed for %s: %s", patient_ins, exc)
            else:
                with self._lock:
                    if len(self._relayed) > 100_000:
                        self._relayed.clear()
                    self._relayed[raw] = (directives, time.monotonic())
                return self._keep(patient_ins, directives)
        elif any(key == NO_DIRECTIVES_KEY for key, _ in metadata):
            # The directory says "none", as its GetDirectives would; a version this node
            # has seen is still never forgotten (_keep).
            return self._keep(patient_ins, PatientDirectives(patient_ins))
        cached = self._cache.get(patient_ins)
        if cached is not None and time.monotonic() - cached[1] < self._staleness:
            return cached[0]
        if self._stub is None:
            return cached[0] if cached else PatientDirectives(patient_ins)
        try:
            answer: directory_service_pb2.GetDirectivesResponse = self._stub.GetDirectives(
                directory_service_pb2.GetDirectivesRequest(patient_ins=patient_ins), timeout=2
            )
        except grpc.RpcError as exc:
            if not fail_closed:
                log.warning(
                    "directives of %s unknown (directory unreachable): write accepted", patient_ins
                )
                return cached[0] if cached else PatientDirectives(patient_ins)
            raise Unavailable(
                "cannot check the patient's directives: the directory does not answer"
                f" ({exc.code().name}); retry shortly"
            ) from None
        if not answer.HasField("directives"):
            return self._keep(patient_ins, PatientDirectives(patient_ins))
        return self._keep(patient_ins, self._verify(answer.directives, patient_ins))

    def _known_bytes(self, raw: bytes, patient_ins: str) -> PatientDirectives | None:
        """The verdict on these very relayed bytes within the staleness bound, if any (a
        set about another patient is never reused: it is verified, and refused, again)."""
        known = self._relayed.get(raw)
        if known is None or time.monotonic() - known[1] >= self._staleness:
            return None
        if known[0].patient_ins != patient_ins:
            return None
        return known[0]

    def _verify(self, signed: access_pb2.SignedDirectives, patient_ins: str) -> PatientDirectives:
        """Verify a signed set, or reuse the verdict on the same set within the staleness
        bound (so a revoked patient certificate is noticed as fast as a changed set)."""
        now = time.monotonic()
        known = self._verified.get(signed.signature)
        if known is not None and now - known[1] < self._staleness:
            if known[0].patient_ins != patient_ins:
                raise InvalidArgument("these directives are about another patient")
            return known[0]
        directives = verify_directives(self._signatures, signed, patient_ins)
        with self._lock:
            if len(self._verified) > 100_000:
                self._verified.clear()
            self._verified[signed.signature] = (directives, now)
        return directives

    def _keep(self, patient_ins: str, directives: PatientDirectives) -> PatientDirectives:
        with self._lock:
            cached = self._cache.get(patient_ins)
            if cached is not None and cached[0].version > directives.version:
                log.warning(
                    "directives of %s: refusing version %d older than version %d already seen",
                    patient_ins, directives.version, cached[0].version,
                )  # fmt: skip
                directives = cached[0]
            self._cache[patient_ins] = (directives, time.monotonic())
        return directives


def _carried_bytes(metadata: Sequence[tuple[str, str | bytes]]) -> bytes | None:
    for key, value in metadata:
        if key == DIRECTIVES_KEY and isinstance(value, bytes):
            return value
    return None


def _parsed(raw: bytes) -> access_pb2.SignedDirectives | None:
    try:
        return access_pb2.SignedDirectives.FromString(raw)
    except DecodeError:
        return None
