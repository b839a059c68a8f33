"""A patient's access history as FHIR AuditEvents, through the audit's own export."""

from __future__ import annotations

import hashlib
from typing import Any

from dmp.audit.events import EVENT_TYPES, AuditEvent
from dmp.audit.fhir import fhir_audit_event
from dmp.v1 import audit_pb2


def event_from_proto(event: audit_pb2.AuditEvent) -> AuditEvent:
    """The audit event a service sent (its wire form) as the audit package's event."""
    us = event.event_date_time.seconds * 1_000_000 + event.event_date_time.nanos // 1000
    known = event.event_type in EVENT_TYPES
    return AuditEvent(
        event_type=event.event_type,
        event_id="" if known else event.event_type,
        event_action_code=event.event_action_code or ("" if known else "E"),
        event_date_time=max(us, 1),
        event_outcome_indicator=event.event_outcome_indicator,
        purpose_of_use=event.purpose_of_use,
        emergency_reason=event.emergency_reason,
        active_participant_user_id=event.active_participant_user_id,
        active_participant_user_name=event.active_participant_user_name,
        active_participant_role=event.active_participant_role,
        relaying_participant=event.relaying_participant,
        audit_source_id=event.audit_source_id,
        audit_source_region=event.audit_source_region,
        participant_object_patient_ins=event.participant_object_patient_ins,
        participant_object_record_ids=tuple(event.participant_object_record_ids),
        status_code=event.status_code or "OK",
        request_id=event.request_id,
        repeat_count=max(event.repeat_count, 1),
    )


def audit_event_resource(event: audit_pb2.AuditEvent) -> dict[str, Any]:
    """A FHIR R4 AuditEvent, its id a digest of the event (stable across reads)."""
    resource = fhir_audit_event(event_from_proto(event))
    digest = hashlib.sha256(event.SerializeToString(deterministic=True)).hexdigest()
    resource["id"] = f"audit-{digest[:40]}"
    if event.repeat_count > 1:
        resource["outcomeDesc"] += f" (x {event.repeat_count})"
    return resource
