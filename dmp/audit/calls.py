"""Auditing the calls of a service: one event per access to patient data, allowed or
refused, recorded where it happened (dmp/audit/log.py is the log itself).

A read records its event, committed, before returning data; a write appends its event in
the same transaction as the record; a refusal is recorded as well. If the event cannot be
written the call fails with UNAVAILABLE rather than serve untraced data.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from sqlalchemy.orm import Session

from dmp.assertion import VerifiedAssertion
from dmp.audit.events import AuditEvent, EventType, Outcome, outcome_for_status
from dmp.audit.log import AuditLog
from dmp.audit.refusals import RefusalTrail
from dmp.clock import from_us
from dmp.errors import DmpError
from dmp.failures import public_failure
from dmp.group_commit import Pending
from dmp.identity import Principal, Role
from dmp.server import CallContext
from dmp.v1 import audit_pb2

#: Metadata the directory passes to nodes so their events share the view's request id.
REQUEST_ID_KEY = "x-dmp-request-id"

_REFUSALS = {"PERMISSION_DENIED", "UNAUTHENTICATED"}

_log = logging.getLogger("dmp.audit")


def request_id_of(context: CallContext) -> str:
    """The request id the directory gave this call, or a new one."""
    if context.principal.role is Role.DIRECTORY:
        for key, value in context.invocation_metadata():
            if key == REQUEST_ID_KEY and isinstance(value, str) and len(value) <= 64:
                return value
    return uuid.uuid4().hex


@dataclass
class AuditedCall:
    """What one call's event will say; filled in as the call learns who and what."""

    log: AuditLog
    event_type: str
    transport: Principal
    request_id: str
    patient_ins: str = ""
    subject: Principal | None = None
    assertion: VerifiedAssertion | None = None
    record_ids: Sequence[str] = field(default_factory=tuple)
    detail: str = ""
    recorded: bool = False
    #: The assertion's nonce, only reserved so far: it commits with this call's event.
    nonce: tuple[bytes, int] | None = None

    def caller(self, assertion: VerifiedAssertion | None, subject: Principal | None = None) -> None:
        self.assertion = assertion
        self.subject = assertion.subject if assertion is not None else subject
        if assertion is not None:
            self.patient_ins = assertion.patient_ins
            self.nonce = assertion.nonce_due

    def event(self, status: str = "OK", event_type: str | None = None) -> AuditEvent:
        who = self.subject or self.transport
        relayed = who.uri != self.transport.uri and self.transport.role is Role.DIRECTORY
        return AuditEvent(
            event_type=event_type or self.event_type,
            event_outcome_indicator=outcome_for_status(status),
            status_code=status,
            purpose_of_use=self.assertion.purpose_name if self.assertion else "",
            emergency_reason=self.assertion.reason
            if self.assertion and self.assertion.emergency
            else "",
            active_participant_user_id=who.uri,
            active_participant_user_name=who.name,
            active_participant_role=who.profession
            or (who.role.value if who.role is not Role.PRACTITIONER else ""),
            relaying_participant=self.transport.uri if relayed else "",
            participant_object_patient_ins=self.patient_ins,
            participant_object_record_ids=tuple(self.record_ids),
            request_id=self.request_id,
            detail=self.detail,
        )

    def commit(self, record_ids: Sequence[str] = ()) -> None:
        """Record the allowed access, committed: call before returning any data."""
        if record_ids:
            self.record_ids = record_ids
        self.log.record(self.event(), self.nonce)
        self.nonce = None
        self.recorded = True

    def start_commit(self) -> Pending[int]:
        """commit() begun now and waited for later (`result()`, which the call must wait
        for before answering): the flush overlaps the call's own work. The event is the
        one this call describes now."""
        pending = self.log.start_record(self.event(), self.nonce)
        self.nonce = None
        return _Committing(self, pending)

    def commit_each(self, patients: Sequence[str]) -> None:
        """Record the allowed access as one event per patient it touched, committed."""
        events = []
        for ins in dict.fromkeys(patients):
            self.patient_ins = ins
            events.append(self.event())
        if events:
            self.log.record_many(events, self.nonce)
            self.nonce = None
        self.recorded = True

    def append(self, session: Session, record_ids: Sequence[str] = ()) -> None:
        """Append the allowed write's event in the write's own transaction."""
        if record_ids:
            self.record_ids = record_ids
        self.log.append(session, self.event(), self.nonce)
        self.recorded = True

    def append_each(self, session: Session, ids_by_patient: Mapping[str, Sequence[str]]) -> None:
        """Append the allowed write's events, one per patient it touched naming that
        patient's records, in the write's own transaction (one INSERT)."""
        events = []
        for ins, ids in ids_by_patient.items():
            self.patient_ins, self.record_ids = ins, ids
            events.append(self.event())
        if events:
            self.log.append_many(session, events, self.nonce)
        self.recorded = True


class _Committing:
    """An audit commit under way; the call is recorded once it is durable."""

    def __init__(self, audited: AuditedCall, pending: Pending[int]) -> None:
        self._audited = audited
        self._pending = pending

    def result(self) -> int:
        seq = self._pending.result()
        self._audited.recorded = True
        return seq


class Auditor:
    """Audits the calls of one service. Refusals and other errors the caller's request
    earned go through ``refusals``, which counts identical ones (dmp/audit/refusals.py); a
    failure of ours is recorded with its real status (dmp/failures.py)."""

    def __init__(self, log: AuditLog, refusals: RefusalTrail | None = None) -> None:
        self.log = log
        self.refusals = refusals or RefusalTrail(log)

    @contextmanager
    def call(
        self, context: CallContext, event_type: EventType, patient_ins: str = ""
    ) -> Iterator[AuditedCall]:
        """Audit one call: the body records success itself (commit/append); an error is
        recorded here, as a refusal when it is one, then raised again (anything but a
        domain error as the DmpError it is answered with)."""
        audited = AuditedCall(
            self.log, event_type, context.principal, request_id_of(context), patient_ins
        )
        try:
            yield audited
            if audited.nonce is not None:  # the call ended without its audit commit
                self.log.store_nonce(audited.nonce)
        except DmpError as exc:
            if audited.nonce is not None:
                self.log.store_nonce(audited.nonce)
            if not audited.recorded:
                status = exc.code.name
                kind = EventType.REFUSED if status in _REFUSALS else event_type
                audited.detail = audited.detail or exc.message[:200]
                event = audited.event(status, kind)
                if outcome_for_status(status) is Outcome.MINOR_FAILURE:
                    self.refusals.record(context.principal, event)
                else:
                    self._record_failure(event)
            raise
        except Exception as exc:
            if audited.nonce is not None:
                self.log.store_nonce(audited.nonce)
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                raise  # the peer cancelled its call: nothing failed here
            error = public_failure(exc, f"{event_type} by {context.principal.uri}")
            if not audited.recorded:
                audited.detail = error.message[:200]
                self._record_failure(audited.event(error.code.name))
            raise error from exc

    def _record_failure(self, event: AuditEvent) -> None:
        """Record the event of a failed call; if even that fails (a full disk), the call
        fails all the same, and the audit log has logged why."""
        try:
            self.log.record(event)
        except DmpError as exc:
            _log.error("the failure of a call could not be audited either: %s", exc.message)

    def close(self) -> None:
        """Write the refusals still counted, then a last signed checkpoint (at shutdown)."""
        self.refusals.close()
        self.log.close()


def to_proto(event: AuditEvent) -> audit_pb2.AuditEvent:
    return audit_pb2.AuditEvent(
        event_date_time=from_us(event.event_date_time),
        event_type=event.event_type,
        event_action_code=event.event_action_code,
        event_outcome_indicator=event.event_outcome_indicator,
        status_code=event.status_code,
        purpose_of_use=event.purpose_of_use,
        emergency_reason=event.emergency_reason,
        active_participant_user_id=event.active_participant_user_id,
        active_participant_user_name=event.active_participant_user_name,
        active_participant_role=event.active_participant_role,
        relaying_participant=event.relaying_participant,
        audit_source_id=event.audit_source_id,
        audit_source_region=event.audit_source_region,
        participant_object_patient_ins=event.participant_object_patient_ins,
        participant_object_record_ids=event.participant_object_record_ids,
        request_id=event.request_id,
        repeat_count=event.repeat_count,
    )


def history_events(
    log: AuditLog, patient_ins: str, *, exclude_own: bool, limit: int
) -> list[AuditEvent]:
    """The events about a patient made by people (not services' own plumbing), newest first."""
    own = f"urn:dmp:patient:{patient_ins}"
    events = []
    for logged in log.events_for_patient(patient_ins, limit=min(10_000, limit * 4)):
        event = logged.event
        if not event.active_participant_user_id.startswith(
            ("urn:dmp:practitioner:", "urn:dmp:patient:")
        ):
            continue
        if exclude_own and event.active_participant_user_id == own:
            continue
        events.append(event)
        if len(events) == limit:
            break
    return events
