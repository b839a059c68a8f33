"""Export of audit events as JSON lines or FHIR R4 AuditEvent resources."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any, Final, Literal

from sqlalchemy import (
    Engine,
    Table,
    select,
)

from dmp.audit.events import DCM, LOCAL_EVENT_SYSTEM, AuditEvent, iso_instant
from dmp.clock import now_us
from dmp.fhir.systems import (
    PROFESSION_SYSTEM,
    RECORD_ID_SYSTEM,
    identifier_for,
    ins_identifier,
)
from dmp.purposes import ACT_REASON_SYSTEM, Purpose

_ENTITY_TYPE: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE: Final = "http://terminology.hl7.org/CodeSystem/object-role"
_BALP_ENTITY_TYPE: Final = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
_SECURITY_ROLE: Final = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
_SOURCE_TYPE: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"


def _fhir_id(source_id: str, seq: int) -> str:
    """A FHIR id ([A-Za-z0-9.-]{1,64}) for event ``seq`` of a log: node-11-42, directory-7."""
    slug = "".join(
        ch if ch.isascii() and (ch.isalnum() or ch in ".-") else "-"
        for ch in source_id.removeprefix("urn:dmp:")
    )
    return f"{slug[:40] or 'audit'}-{seq}"


def fhir_audit_event(event: AuditEvent, *, seq: int | None = None) -> dict[str, Any]:
    """A FHIR R4 AuditEvent resource for ``event`` (``seq`` gives it an id)."""
    code = event.code
    resource: dict[str, Any] = {"resourceType": "AuditEvent"}
    if seq is not None:
        resource["id"] = _fhir_id(event.audit_source_id, seq)
    resource["type"] = {"system": code.system, "code": code.event_id, "display": code.display}
    resource["subtype"] = [
        {"system": LOCAL_EVENT_SYSTEM, "code": event.event_type, "display": event.event_type}
    ]
    resource["action"] = event.event_action_code
    resource["recorded"] = iso_instant(event.event_date_time)
    resource["outcome"] = str(event.event_outcome_indicator)
    resource["outcomeDesc"] = event.status_code + (f": {event.detail}" if event.detail else "")
    purpose = Purpose.named(event.purpose_of_use)
    if purpose is not None:
        code_of_use, display = purpose.act_reason
        concept: dict[str, Any] = {
            "coding": [{"system": ACT_REASON_SYSTEM, "code": code_of_use, "display": display}]
        }
        if event.emergency_reason:
            concept["text"] = event.emergency_reason
        resource["purposeOfEvent"] = [concept]
    user: dict[str, Any] = {
        "type": {
            "coding": [{"system": _SECURITY_ROLE, "code": "humanuser", "display": "human user"}]
        },
    }
    if event.active_participant_role:
        user["role"] = [
            {
                "coding": [{"system": PROFESSION_SYSTEM, "code": event.active_participant_role}],
                "text": event.active_participant_role,
            }
        ]
    if event.active_participant_user_id:
        # FR Core: a professional by their RPPS, a patient by their INS-NIR.
        who: dict[str, Any] = {"identifier": identifier_for(event.active_participant_user_id)}
        if event.active_participant_user_name:
            who["display"] = event.active_participant_user_name
        user["who"] = who
    if event.active_participant_user_name:
        user["name"] = event.active_participant_user_name
    user["requestor"] = True
    agents = [user]
    if event.relaying_participant:
        agents.append(
            {
                "type": {
                    "coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]
                },
                "who": {
                    "identifier": identifier_for(event.relaying_participant),
                    "display": event.relaying_participant,
                },
                "requestor": False,
            }
        )
    resource["agent"] = agents
    source: dict[str, Any] = {}
    if event.audit_source_region:
        source["site"] = event.audit_source_region
    source["observer"] = (
        {
            "identifier": identifier_for(event.audit_source_id),
            "display": event.audit_source_id,
        }
        if event.audit_source_id
        else {"display": "unknown audit source"}  # FHIR has no empty strings
    )
    source["type"] = [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}]
    resource["source"] = source
    entities: list[dict[str, Any]] = []
    if event.participant_object_patient_ins:
        entities.append(
            {
                "what": {"identifier": ins_identifier(event.participant_object_patient_ins)},
                "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    for record_id in event.participant_object_record_ids:
        entities.append(
            {
                "what": {"identifier": {"system": RECORD_ID_SYSTEM, "value": record_id}},
                "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": _OBJECT_ROLE, "code": "3", "display": "Report"},
            }
        )
    if event.request_id:
        entities.append(
            {
                "what": {"identifier": {"value": event.request_id}},
                "type": {
                    "system": _BALP_ENTITY_TYPE,
                    "code": "XrequestId",
                    "display": "transport specific unique identifier",
                },
            }
        )
    if entities:
        resource["entity"] = entities
    return resource


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def export_events(
    engine: Engine,
    events_table: Table,
    *,
    since_us: int | None = None,
    fmt: Literal["jsonl", "fhir"] = "jsonl",
) -> Iterator[str]:
    """The events (from ``since_us`` on), in seq order, as text chunks to write in a row.

    ``jsonl``: one line per event, the event's fields plus ``seq``. ``fhir``: one FHIR R4
    Bundle of type ``collection`` holding an AuditEvent per event, streamed an entry at a
    time. Rows are streamed from the database, never all held in memory.
    """
    if fmt not in ("jsonl", "fhir"):
        raise ValueError(f"unknown export format {fmt!r}: jsonl or fhir")
    t = events_table
    query = select(t.c.seq, t.c.event_json).order_by(t.c.seq)
    if since_us is not None:
        query = query.where(t.c.event_date_time >= since_us)
    with engine.connect() as conn:
        rows = conn.execution_options(yield_per=5_000).execute(query)
        if fmt == "jsonl":
            for seq, event_json in rows:
                event = AuditEvent.from_json(event_json)
                yield _compact({"seq": seq, **event.to_dict()}) + "\n"
            return
        yield (
            _compact(
                {
                    "resourceType": "Bundle",
                    "id": str(uuid.uuid4()),
                    "type": "collection",
                    "timestamp": iso_instant(now_us()),
                }
            )[:-1]
            + ',"entry":['
        )
        separator = "\n"
        for seq, event_json in rows:
            event = AuditEvent.from_json(event_json)
            resource = fhir_audit_event(event, seq=seq)
            name = uuid.uuid5(uuid.NAMESPACE_URL, f"{event.audit_source_id}/{seq}")
            entry = {"fullUrl": f"urn:uuid:{name}", "resource": resource}
            yield separator + _compact(entry)
            separator = ",\n"
        yield "\n]}\n"
