"""Transaction Bundles (IHE MHD ITI-65 "Provide Document Bundle"): checked whole, stored
at one node through the typed client, answered as a ``transaction-response`` Bundle.
Used by the gateway's ``POST /`` and by `dmp fhir import`.

All or nothing, and how. A node never overwrites nor deletes a record, so a write that
failed half-way could not be undone by deleting what it stored; instead nothing is
half-written in the first place, and whatever a failure leaves is completed by a retry:

1. Every entry is checked before anything is written (``dmp.fhir.inbound``): one bad
   entry refuses the Bundle, naming its element, and nothing is stored.
2. Every record id is derived from the patient, the writer and the entry's ``fullUrl``
   (or its resource's identifier): the same Bundle from the same writer always names the
   same records.
3. The records go to the node over one ``IngestRecords`` stream, which the node commits
   in one unit of work (a Bundle holds at most 1000 entries and its body is under the
   gateway's limit, below the node's batch of 1000 records and 64 MiB): the node stores
   all of them, or none (a refusal of the writer, an identity conflict, an id already
   used with other content all roll the unit back). What the node checks record by
   record before that unit is checked here first, the same way: ``validate_draft``, each
   content under the node's default limit of 20 MiB, and one access answer for the whole
   Bundle (one writer, one patient, no patient's note beside professionals' records).
4. If the answer is lost (the node or the network failed after the commit), sending the
   same Bundle again is safe: a node answers a put of a record it holds with the same
   content as stored, and stores nothing twice. Before writing, the records of the
   patient the writer already holds at that node are listed, so the answer says which
   entries were new (201) and which were stored before (200).

We chose deterministic ids over a server-side transaction log because the node's own
idempotency on record ids already gives exactly-once storage without any new state, and
because a hospital system retries by resending the same Bundle, which then just works.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import grpc

from dmp.client import NodeClient
from dmp.errors import InvalidArgument
from dmp.fhir.bundles import now_instant
from dmp.fhir.errors import FhirError, from_rpc, issue, operation_outcome
from dmp.fhir.inbound import (
    MAX_ENTRIES,
    NOT_STORED,
    STRUCTURED,
    Put,
    Resource,
    Submission,
    document,
    invalid,
    patient_traits,
    structured,
    subject_ins,
)
from dmp.fhir.mapping import fhir_id
from dmp.patients import traits_of
from dmp.records import validate_draft
from dmp.tls import DEFAULT_MAX_CONTENT
from dmp.v1 import node_service_pb2 as npb
from dmp.v1 import patient_pb2, record_pb2

_METHODS: Final = ("POST", "PUT")


def load(data: bytes) -> Any:
    """A request body or file as JSON; 400 when it is not JSON, or nests deeper than the
    parser goes (a RecursionError, not a ValueError)."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FhirError(
            400, "invalid", f"the body is not JSON: {exc}", expression="Bundle"
        ) from None
    except RecursionError:
        raise FhirError(
            400, "invalid", "the body is not a Bundle: its JSON nests too deep", expression="Bundle"
        ) from None


def _entries(body: Any) -> list[Resource]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise invalid("Bundle", "the body must be a FHIR Bundle (resourceType Bundle)")
    if body.get("type") != "transaction":
        raise invalid(
            "Bundle.type",
            f"{body.get('type')!r}: only transaction Bundles are taken (all or nothing)",
        )
    entries = body.get("entry")
    if not isinstance(entries, list) or not entries:
        raise invalid("Bundle.entry", "a transaction needs at least one entry")
    if len(entries) > MAX_ENTRIES:
        raise invalid(
            "Bundle.entry", f"{len(entries)} entries: at most {MAX_ENTRIES} a Bundle", 413
        )
    for index, entry in enumerate(entries):
        path = f"Bundle.entry[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            raise invalid(f"{path}.resource", "required")
        if not isinstance(entry["resource"].get("resourceType"), str):
            raise invalid(f"{path}.resource.resourceType", "required")
        request = entry.get("request")
        if not isinstance(request, dict) or request.get("method") not in _METHODS:
            raise invalid(f"{path}.request.method", "required: POST (or PUT) in a transaction")
        if not isinstance(request.get("url"), str) or not request["url"].startswith(
            entry["resource"]["resourceType"]
        ):
            raise invalid(f"{path}.request.url", "must name the entry's resource type")
        if "fullUrl" in entry and not isinstance(entry["fullUrl"], str):
            raise invalid(f"{path}.fullUrl", "must be a URI")
    return entries


def _key(entry: Resource, path: str) -> str:
    """What identifies an entry across retries: its fullUrl, else its first identifier."""
    if entry.get("fullUrl"):
        return str(entry["fullUrl"])
    for identifier in entry["resource"].get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("value"):
            return f"{identifier.get('system', '')}|{identifier['value']}"
    raise invalid(
        f"{path}.fullUrl",
        "required (or a resource identifier): a retried Bundle must name the same records",
    )


@contextmanager
def _element(path: str) -> Iterator[None]:
    """A resource whose checks met an element of the wrong JSON type (a string where FHIR
    wants an object, a number where it wants a list): 400 naming the resource."""
    try:
        yield
    except (TypeError, AttributeError, KeyError, ValueError):
        raise invalid(
            path,
            "an element has the wrong JSON type for FHIR R4 (an object, a list, a string or"
            " a number where another is expected)",
        ) from None


def parse(body: Any, *, max_content: int, writer: str = "") -> Submission:
    """Check a whole transaction Bundle; raise FhirError (400/413, naming the element) at
    the first entry that cannot be stored as it is. ``writer`` (the URI of the identity
    that will store it) goes into every record id: the same Bundle from another writer
    names records of its own, and nobody can take another writer's ids first."""
    entries = _entries(body)
    max_content = min(max_content, DEFAULT_MAX_CONTENT)
    patients: dict[str, str] = {}
    traits: patient_pb2.PatientIdentity | None = None
    binaries: dict[str, tuple[str, Resource]] = {}
    for index, entry in enumerate(entries):
        resource, path = entry["resource"], f"Bundle.entry[{index}].resource"
        if resource["resourceType"] == "Patient":
            if traits is not None:
                raise invalid(path, "one Patient a Bundle: a submission is about one patient")
            with _element(path):
                traits = patient_traits(resource, path)
            try:
                traits_of(traits, path)
            except InvalidArgument as exc:  # names the trait: birth_date, birthplace_code...
                raise FhirError(400, "invalid", exc.message, expression=path) from None
            names = [entry.get("fullUrl"), resource.get("id") and f"Patient/{resource['id']}"]
            patients.update({str(name): traits.ins for name in names if name})
        elif resource["resourceType"] == "Binary":
            names = [entry.get("fullUrl"), resource.get("id") and f"Binary/{resource['id']}"]
            binaries.update({str(name): (path, resource) for name in names if name})
    subjects: dict[int, str | None] = {}
    for i, e in enumerate(entries):
        if e["resource"]["resourceType"] not in ("Patient", "Binary", *NOT_STORED):
            with _element(f"Bundle.entry[{i}].resource"):
                subjects[i] = subject_ins(e["resource"], f"Bundle.entry[{i}].resource", patients)
    named = {ins for ins in subjects.values() if ins}
    if traits is not None:
        named.add(traits.ins)
    if len(named) != 1:
        given = [s for s in subjects.values() if s]
        expected = traits.ins if traits is not None else (given[0] if given else None)
        wrong = [i for i, s in subjects.items() if s and s != expected]
        where = f"Bundle.entry[{wrong[0]}].resource.subject" if wrong else "Bundle.entry"
        raise invalid(
            where,
            "a Bundle is about exactly one patient: "
            + (f"it names {len(named)}" if named else "none is named (subject or Patient)"),
        )
    ins = named.pop()
    submission = Submission(ins, traits, len(entries))
    used: set[str] = set()
    keys: dict[str, int] = {}
    for index, entry in enumerate(entries):
        resource = entry["resource"]
        kind = resource["resourceType"]
        path = f"Bundle.entry[{index}].resource"
        if kind in ("Patient", "Binary") or kind in NOT_STORED:
            submission.skipped[index] = NOT_STORED.get(
                kind, "the patient's identity: its traits go with every record"
            )
            continue
        if index in subjects and subjects[index] is None:
            raise invalid(f"{path}.subject", "required: the patient the entry is about")
        key = _key(entry, f"Bundle.entry[{index}]")
        if key in keys:
            raise invalid(f"Bundle.entry[{index}].fullUrl", f"the same as entry {keys[key]}")
        keys[key] = index
        owned = f"{writer}|{key}" if writer else key
        with _element(path):
            if kind == "DocumentReference":
                put, binary = document(resource, ins, owned, path, binaries)
                if binary is not None:
                    used.add(binary)
            else:
                put = structured(resource, ins, owned, path)
        if len(put.content) > max_content:
            raise invalid(
                path, f"content of {len(put.content)} bytes is over the limit of {max_content}", 413
            )
        try:
            validate_draft(put.record)
        except InvalidArgument as exc:  # its message names the record's field
            raise FhirError(400, "invalid", f"{path}: {exc.message}", expression=path) from None
        if traits is not None:
            put.patient.CopyFrom(traits)
        submission.puts.append(Put(index, kind, put))
    notes = [
        p for p in submission.puts if p.request.record.kind == record_pb2.RECORD_KIND_PATIENT_NOTE
    ]
    if notes and len(notes) != len(submission.puts):
        # A node decides a write by the writer, the patient and whether it is a patient's
        # note: one answer for every record of a Bundle, so that it refuses all or none.
        raise invalid(
            f"Bundle.entry[{notes[0].index}].resource.category",
            "a patient's notes and professionals' records go in separate Bundles",
        )
    for index, entry in enumerate(entries):
        path = f"Bundle.entry[{index}].resource"
        if entry["resource"]["resourceType"] == "Binary":
            if path not in used:
                raise invalid(path, "a Binary no DocumentReference of this Bundle points to")
            submission.skipped[index] = "stored as its DocumentReference's content"
    return submission


@dataclass
class Stored:
    """What a write did: each stored entry's record id and whether it was new."""

    submission: Submission
    new: set[str]

    @property
    def new_count(self) -> int:
        return sum(1 for p in self.submission.puts if p.request.record.id in self.new)

    @property
    def known_count(self) -> int:
        return len(self.submission.puts) - self.new_count


def _held(node: NodeClient, ins: str, timeout: float) -> dict[str, record_pb2.Record]:
    """The patient's records this writer already sees at the node (their own among them)."""
    request = npb.ListRecordsRequest(
        patient_ins=ins,
        statuses=[record_pb2.RECORD_STATUS_CURRENT, record_pb2.RECORD_STATUS_SUPERSEDED],
        page_size=500,
    )
    return {r.id: r for r in node.list_records(request, timeout=timeout)}


def store(
    node: NodeClient, submission: Submission, *, timeout: float = 60, region: str | None = None
) -> Stored:
    """Write a checked Bundle at ``node`` (of ``region``, when known), all or nothing (see
    the module docstring)."""
    if not submission.puts:
        return Stored(submission, set())
    try:
        held = _held(node, submission.patient_ins, timeout)
        # Nothing is read back: a writer may be allowed to write what it may not read.
        node.ingest((p.request for p in submission.puts), timeout=timeout)
    except grpc.RpcError as exc:
        error = from_rpc(exc, region=region)
        if error.status in (503, 504):
            error.diagnostics += (
                "; nothing or all of the Bundle was stored: send the same Bundle again, it"
                " stores nothing twice"
            )
        raise error from None
    new = {p.request.record.id for p in submission.puts} - set(held)
    return Stored(submission, new)


def response_bundle(stored: Stored, base: str = "") -> Resource:
    """The ``transaction-response`` Bundle: one entry per entry of the request, in order."""
    by_index = {p.index: p for p in stored.submission.puts}
    prefix = f"{base}/" if base else ""
    entries = []
    for index in range(stored.submission.entries):
        put = by_index.get(index)
        if put is None:
            reason = stored.submission.skipped.get(index, "")
            outcome = operation_outcome(
                [issue("informational", f"not stored: {reason}", severity="information")]
            )
            entries.append({"response": {"status": "200 OK", "outcome": outcome}})
            continue
        record = put.request.record
        resource_type = (
            put.resource_type if put.resource_type in STRUCTURED else "DocumentReference"
        )
        status = "201 Created" if record.id in stored.new else "200 OK"
        entries.append(
            {
                "response": {
                    "status": status,
                    "location": f"{prefix}{resource_type}/{fhir_id(record.id)}",
                }
            }
        )
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": now_instant()},
        "type": "transaction-response",
        "entry": entries,
    }


def register_patient(
    register: Callable[[patient_pb2.PatientIdentity], Any], submission: Submission
) -> None:
    """Make the Bundle's patient known to the directory (created, or confirmed), when the
    Patient carries every trait the directory requires (birth name, given names, birth
    date, gender, birth place); the node keeps whatever traits it has in any case."""
    traits = submission.traits
    complete = traits is not None and all(
        (traits.birth_family_name, traits.given_names, traits.birth_date, traits.sex,
         traits.birthplace_code)
    )  # fmt: skip
    if traits is None or not complete:
        return
    try:
        register(traits)
    except grpc.RpcError as exc:
        raise from_rpc(exc) from None
