"""The node's use cases on prescriptions: each audits its call, checks access through the
policy (dmp/policy.py), applies the rules (dmp/prescription_rules.py), and writes in one
unit of work the prescription's new progress, its dispensing, the `prescription` or
`dispensation` record (through the record repository, so that it reaches the consolidated
view and the locator outbox) and its audit event.

This node is authoritative for the prescriptions whose id names its region. Exactly once:
a change of progress reads the prescription's row locked in its unit of work and writes it
conditionally on the version read; the database refuses a second dispensing with the same
number or idempotency key. A retry with the same key answers the first outcome.

Calls on one prescription carry an assertion naming it in record_id; its patient_ins may be
empty (a pharmacist who scanned the id): the patient is then the prescription's, whose
directives apply; a given one must be the prescription's, and the refusal says nothing of
whether the id exists for someone else.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from dmp.assertion import CLOCK_SKEW_US, VerifiedAssertion
from dmp.audit.calls import AuditedCall, Auditor
from dmp.audit.events import EventType
from dmp.clock import from_us, now_us, to_us
from dmp.directives import PatientDirectives
from dmp.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from dmp.fields import check_text
from dmp.identity import Principal
from dmp.ins import normalize_ins
from dmp.policy import (
    check_canceller,
    check_dispenser,
    check_dispensing_profession,
    check_find_prescriptions,
    check_masked_prescription,
    check_prescribe,
    check_prescription_reader,
    may_read_prescription,
    prescription_masked_from,
)
from dmp.prescription_fhir import CONTENT_TYPE, medication_dispenses, medication_requests
from dmp.prescription_rules import (
    cancel,
    check_cancel_reason,
    check_dispensable,
    check_dispensed_lines,
    check_idempotency_key,
    claim,
    dispensed,
    release,
    state,
    status,
)
from dmp.prescriptions import (
    DISPENSABLE_STATUSES,
    DISPENSATION_TYPE,
    PRESCRIPTION_TYPE,
    STATUS_NAMES,
    WRONG_REGION,
    prescription_region,
    verify_prescription,
)
from dmp.regions import region_name
from dmp.server import CallContext
from dmp.signing import SignatureVerifier
from dmp.unit_of_work import UnitOfWork
from dmp.v1 import access_pb2, record_pb2
from dmp.v1 import prescription_pb2 as P
from node.access import NodeAccess
from node.models import PrescriptionRow
from node.prescription_store import PrescriptionStore, payload_digest, progress_of
from node.store import RecordStore

MAX_PHARMACY = 200


class PrescriptionService:
    """What a node does with the prescriptions it holds, for the person each call is for."""

    def __init__(
        self,
        engine: Engine,
        prescriptions: PrescriptionStore,
        records: RecordStore,
        access: NodeAccess,
        auditor: Auditor,
        signatures: SignatureVerifier,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self._clock = clock
        self._engine = engine
        self._store = prescriptions
        self._records = records
        self._access = access
        self._auditor = auditor
        self._signatures = signatures
        self.region = records.region

    # -- creating ---------------------------------------------------------------------------

    def create(self, context: CallContext, signed: P.SignedPrescription) -> P.StoredPrescription:
        """Store a prescription its prescriber signed; idempotent on the id."""
        with self._audit(context, EventType.PRESCRIPTION_CREATE) as audited:
            prescription, signer = verify_prescription(signed, self._signatures)
            audited.patient_ins = prescription.patient_ins
            audited.record_ids = (prescription.id,)
            if signer.uri != context.principal.uri:
                raise PermissionDenied(
                    "a prescription is stored by its prescriber, with their own certificate:"
                    f" this one is signed by {signer.uri}"
                )
            self._check_region(prescription.id)
            if to_us(prescription.authored_time) > self._clock() + CLOCK_SKEW_US:
                raise InvalidArgument(
                    "prescription.authored_time is in the future: check the prescriber's clock"
                )
            directives = self._access.directives(
                context, prescription.patient_ins, fail_closed=False
            )
            check_prescribe(signer, directives)
            try:
                return self._create(audited, signer, prescription, signed)
            except IntegrityError:  # the same id stored by a concurrent call (PostgreSQL)
                row = self._store.find(prescription.id)
                if row is None:
                    raise
                self._same_act(row, signed)
                audited.detail = "retry: the prescription stored first"
                audited.commit([prescription.id])
                return self._stored(row, [], signer.uri)

    def _create(
        self,
        audited: AuditedCall,
        prescriber: Principal,
        prescription: P.Prescription,
        signed: P.SignedPrescription,
    ) -> P.StoredPrescription:
        now = self._clock()
        with self._unit(audited) as uow:
            row = self._store.lock(uow.session, prescription.id)
            if row is not None:
                self._same_act(row, signed)
                audited.detail = "retry: the prescription stored first"
                uow.audit([prescription.id])
                given = self._store.dispensations(uow.session, prescription.id)
                uow.commit()
                return self._stored(row, given, prescriber.uri)
            row = self._store.insert(uow.session, prescription, signed, now)
            record = record_pb2.Record(
                patient_ins=prescription.patient_ins,
                kind=record_pb2.RECORD_KIND_PRESCRIPTION,
                type_code=PRESCRIPTION_TYPE,
                title=f"Ordonnance électronique {prescription.id}",
                organization=prescription.prescriber.organization,
                effective_time=prescription.authored_time,
                content_type=CONTENT_TYPE,
            )
            draft = self._records.prepare(
                prescriber, record, medication_requests(prescription), None,
                prescription_id=prescription.id,
            )  # fmt: skip
            written = self._records.write(uow.session, [draft])
            uow.audit([prescription.id, written[0].id])
            uow.commit()
        return self._stored(row, [], prescriber.uri)

    @staticmethod
    def _same_act(row: PrescriptionRow, signed: P.SignedPrescription) -> None:
        if row.payload_sha256 != payload_digest(signed):
            raise AlreadyExists(
                f"prescription {row.id} already exists with other content: a prescription is"
                " never overwritten; choose a new id for a new prescription"
            )

    # -- reading ----------------------------------------------------------------------------

    def get(self, context: CallContext, prescription_id: str) -> P.StoredPrescription:
        with self._audit(context, EventType.PRESCRIPTION_READ) as audited:
            assertion = self._caller(
                context, audited, access_pb2.OPERATION_READ_PRESCRIPTION, prescription_id
            )
            row, given = self._store.with_dispensations(prescription_id)
            bound = self._bind(audited, assertion, row, prescription_id)
            assert row is not None
            directives = self._directives(context, assertion, row.patient_ins)
            check_prescription_reader(bound, directives, row.prescriber_rpps, self._access.matrix)
            masked = (
                self._store.record_ids(row.patient_ins, [prescription_id])
                if directives.masked_record_ids
                else {}
            )
            check_masked_prescription(
                bound.subject, directives, masked.get(prescription_id, ""), row.prescriber_rpps
            )
            stored = self._stored(row, given, bound.subject.uri)
            audited.commit([prescription_id])
            return stored

    def find(
        self,
        context: CallContext,
        patient_ins: str,
        statuses: Sequence[P.PrescriptionStatus.ValueType],
    ) -> list[P.StoredPrescription]:
        """The patient's prescriptions held here, newest first: those still dispensable
        unless `statuses` says which."""
        with self._audit(context, EventType.PRESCRIPTION_FIND, patient_ins) as audited:
            patient = normalize_ins(patient_ins, "patient_ins")
            assertion = self._access.asserted(
                context, access_pb2.OPERATION_FIND_PRESCRIPTIONS, patient
            )
            audited.caller(assertion)
            wanted = set(statuses) or set(DISPENSABLE_STATUSES)
            if P.PRESCRIPTION_STATUS_UNSPECIFIED in wanted:  # in a filter: any status
                wanted = set(STATUS_NAMES)
            for value in wanted:
                if value not in STATUS_NAMES:
                    raise InvalidArgument(f"statuses: {value} is not a known prescription status")
            directives = self._access.directives(context, patient)
            matrix = self._access.matrix
            check_find_prescriptions(assertion, directives, matrix)
            now = self._clock()
            found, ids = [], []
            rows = self._store.for_patient(patient)
            records = (
                self._store.record_ids(patient, [row.id for row, _ in rows])
                if directives.masked_record_ids
                else {}
            )
            for row, given in rows:
                if not may_read_prescription(
                    assertion.subject, patient, row.prescriber_rpps, matrix
                ) or prescription_masked_from(
                    assertion.subject, directives, records.get(row.id, ""), row.prescriber_rpps
                ):
                    continue
                _, prescription = self._prescription(row)
                if status(prescription, progress_of(row), now) in wanted:
                    found.append(self._stored(row, given, assertion.subject.uri))
                    ids.append(row.id)
            audited.commit(ids)
            return found

    # -- holding ----------------------------------------------------------------------------

    def claim(
        self, context: CallContext, prescription_id: str, pharmacy: str, hold_seconds: int
    ) -> P.StoredPrescription:
        with self._audit(context, EventType.PRESCRIPTION_CLAIM) as audited:
            check_text(pharmacy, "pharmacy", MAX_PHARMACY)
            bound = self._dispenser(context, audited, prescription_id)
            holder = bound.subject.uri
            with self._unit(audited) as uow:
                row, prescription = self._locked(uow, prescription_id)
                progress = claim(
                    prescription, progress_of(row), self._clock(), holder, hold_seconds
                )
                self._store.save_progress(uow.session, row, progress, pharmacy=pharmacy)
                given = self._store.dispensations(uow.session, prescription_id)
                uow.audit([prescription_id])
                uow.commit()
            return self._stored(row, given, holder)

    def release(self, context: CallContext, prescription_id: str) -> P.StoredPrescription:
        with self._audit(context, EventType.PRESCRIPTION_RELEASE) as audited:
            bound = self._dispenser(context, audited, prescription_id)
            holder = bound.subject.uri
            with self._unit(audited) as uow:
                row, prescription = self._locked(uow, prescription_id)
                before = progress_of(row)
                progress = release(prescription, before, self._clock(), holder)
                if progress != before:
                    self._store.save_progress(uow.session, row, progress)
                given = self._store.dispensations(uow.session, prescription_id)
                uow.audit([prescription_id])
                uow.commit()
            return self._stored(row, given, holder)

    # -- dispensing -------------------------------------------------------------------------

    def dispense(
        self, context: CallContext, request: P.Dispensation
    ) -> tuple[P.Dispensation, P.StoredPrescription]:
        """Record one dispensing, exactly once; a retry with the same idempotency key
        answers the dispensing recorded first and records nothing more."""
        with self._audit(context, EventType.PRESCRIPTION_DISPENSE) as audited:
            prescription_id = request.prescription_id
            bound = self._dispenser(context, audited, prescription_id)
            key = check_idempotency_key(request.idempotency_key)
            check_text(request.pharmacy, "dispensation.pharmacy", MAX_PHARMACY)
            try:
                return self._dispense(audited, bound.subject, request, key)
            except IntegrityError:
                # A concurrent retry with the same key committed first (the database's
                # UNIQUE constraint): answer it.
                row, given = self._store.with_dispensations(prescription_id)
                first = next((d for d in given if d.idempotency_key == key), None)
                if row is None or first is None:
                    raise
                self._same_dispensing(first, bound.subject, request)
                audited.detail = f"retry: dispensing {first.id} recorded first"
                audited.commit([prescription_id, first.id])
                return first, self._stored(row, given, bound.subject.uri)

    def _dispense(
        self, audited: AuditedCall, pharmacist: Principal, request: P.Dispensation, key: str
    ) -> tuple[P.Dispensation, P.StoredPrescription]:
        prescription_id = request.prescription_id
        with self._unit(audited) as uow:
            row, prescription = self._locked(uow, prescription_id)
            first = self._store.dispensation_by_key(uow.session, prescription_id, key)
            if first is not None:
                self._same_dispensing(first, pharmacist, request)
                audited.detail = f"retry: dispensing {first.id} recorded first"
                uow.audit([prescription_id, first.id])
                given = self._store.dispensations(uow.session, prescription_id)
                uow.commit()
                return first, self._stored(row, given, pharmacist.uri)
            now = self._clock()
            progress = progress_of(row)
            number = check_dispensable(prescription, progress, now, pharmacist.uri)
            lines = check_dispensed_lines(prescription, request.lines)
            dispensation = P.Dispensation(
                id=str(uuid.uuid4()),
                prescription_id=prescription_id,
                dispensing=number,
                lines=lines,
                pharmacist_rpps=pharmacist.key,
                pharmacist_name=pharmacist.name,
                pharmacy=request.pharmacy,
                time=from_us(now),
                idempotency_key=key,
            )
            self._store.add_dispensation(uow.session, dispensation, pharmacist.uri, now)
            self._store.save_progress(uow.session, row, dispensed(progress, now))
            title = f"Délivrance de l'ordonnance {prescription_id}" + (
                f", renouvellement {number}" if number else ""
            )
            record = record_pb2.Record(
                id=dispensation.id,
                patient_ins=prescription.patient_ins,
                kind=record_pb2.RECORD_KIND_DISPENSATION,
                type_code=DISPENSATION_TYPE,
                title=title,
                organization=request.pharmacy,
                effective_time=dispensation.time,
                content_type=CONTENT_TYPE,
            )
            content = medication_dispenses(prescription, dispensation)
            draft = self._records.prepare(
                pharmacist, record, content, None, prescription_id=prescription_id
            )
            self._records.write(uow.session, [draft])
            audited.detail = f"dispensing {number} of {1 + prescription.renewals}"
            uow.audit([prescription_id, dispensation.id])
            given = self._store.dispensations(uow.session, prescription_id)
            uow.commit()
        return dispensation, self._stored(row, given, pharmacist.uri)

    @staticmethod
    def _same_dispensing(
        first: P.Dispensation, pharmacist: Principal, request: P.Dispensation
    ) -> None:
        """A retry is the same dispensing again: same pharmacist, pharmacy and lines."""
        if (
            first.pharmacist_rpps != pharmacist.key
            or first.pharmacy != request.pharmacy
            or list(first.lines) != list(request.lines)
        ):
            raise AlreadyExists(
                "dispensation.idempotency_key was already used for another dispensing of this"
                " prescription: the pharmacy's software chooses a new key for each dispensing"
            )

    # -- cancelling -------------------------------------------------------------------------

    def cancel(
        self, context: CallContext, prescription_id: str, reason: str
    ) -> P.StoredPrescription:
        with self._audit(context, EventType.PRESCRIPTION_CANCEL) as audited:
            check_cancel_reason(reason)
            assertion = self._caller(
                context, audited, access_pb2.OPERATION_CANCEL_PRESCRIPTION, prescription_id
            )
            row = self._store.find(prescription_id)
            bound = self._bind(audited, assertion, row, prescription_id)
            assert row is not None
            directives = self._directives(context, assertion, row.patient_ins)
            check_canceller(bound, directives, row.prescriber_rpps)
            # The reason is the prescriber's free text: stored with the prescription, never
            # in the audit (an event's detail holds no record content).
            audited.detail = "with a reason" if reason.strip() else ""
            with self._unit(audited) as uow:
                row, prescription = self._locked(uow, prescription_id)
                before = progress_of(row)
                progress = cancel(prescription, before, self._clock())
                if progress != before:
                    self._store.save_progress(uow.session, row, progress, cancel_reason=reason)
                given = self._store.dispensations(uow.session, prescription_id)
                uow.audit([prescription_id])
                uow.commit()
            return self._stored(row, given, bound.subject.uri)

    # -- shared steps -----------------------------------------------------------------------

    @contextmanager
    def _audit(
        self, context: CallContext, event_type: EventType, patient_ins: str = ""
    ) -> Iterator[AuditedCall]:
        """The call's audit; a refusal a pharmacist's software acts on names its reason."""
        with self._auditor.call(context, event_type, patient_ins) as audited:
            try:
                yield audited
            except FailedPrecondition as exc:
                if not audited.recorded:
                    audited.detail = f"{exc.reason}: {exc.message}"[:200]
                raise

    def _check_region(self, prescription_id: str) -> None:
        region = prescription_region(prescription_id)
        if region != self.region:
            raise FailedPrecondition(
                f"prescription {prescription_id} belongs to region {region}"
                f" ({region_name(region)}), not to this node of region {self.region}: send"
                f" it to the node of region {region} (the directory routes it by its id)",
                reason=WRONG_REGION,
            )

    def _caller(
        self,
        context: CallContext,
        audited: AuditedCall,
        operation: access_pb2.Operation.ValueType,
        prescription_id: str,
    ) -> VerifiedAssertion:
        audited.record_ids = (prescription_id,)
        self._check_region(prescription_id)
        assertion = self._access.asserted(context, operation, record_id=prescription_id)
        audited.caller(assertion)
        return assertion

    def _bind(
        self,
        audited: AuditedCall,
        assertion: VerifiedAssertion,
        row: PrescriptionRow | None,
        prescription_id: str,
    ) -> VerifiedAssertion:
        """The assertion for the prescription's patient: the one it names must be theirs
        (one answer whether the id is missing or another patient's); an empty one is."""
        if assertion.patient_ins:
            if row is None or row.patient_ins != assertion.patient_ins:
                raise PermissionDenied(
                    f"prescription {prescription_id}: no prescription of patient"
                    f" {assertion.patient_ins} with this id on node {self.region}"
                )
        elif row is None:
            raise NotFound(f"prescription {prescription_id} not found on node {self.region}")
        audited.patient_ins = row.patient_ins
        bound = replace(assertion, patient_ins=row.patient_ins)
        audited.assertion = bound
        return bound

    def _dispenser(
        self, context: CallContext, audited: AuditedCall, prescription_id: str
    ) -> VerifiedAssertion:
        """The pharmacist of a claim, release or dispense, as the policy and the patient's
        directives allow."""
        assertion = self._caller(context, audited, access_pb2.OPERATION_DISPENSE, prescription_id)
        row = self._store.find(prescription_id)
        try:
            check_dispensing_profession(assertion.subject)  # permission before existence,
        except PermissionDenied:
            if row is not None and assertion.patient_ins in ("", row.patient_ins):
                audited.patient_ins = row.patient_ins  # but the patient sees the attempt
            raise
        bound = self._bind(audited, assertion, row, prescription_id)
        assert row is not None
        check_dispenser(bound, self._directives(context, assertion, row.patient_ins))
        return bound

    def _directives(
        self, context: CallContext, assertion: VerifiedAssertion, patient_ins: str
    ) -> PatientDirectives:
        """The prescription's patient's directives. When the assertion named no patient
        (a scanned id), the directory relaying the call could not know whose directives
        to send along: this node asks for this patient's instead."""
        return self._access.directives(
            context, patient_ins, relayed=assertion.patient_ins == patient_ins
        )

    def _locked(
        self, uow: UnitOfWork, prescription_id: str
    ) -> tuple[PrescriptionRow, P.Prescription]:
        row = self._store.lock(uow.session, prescription_id)
        if row is None:  # it was there a moment ago: prescriptions are never deleted
            raise NotFound(f"prescription {prescription_id} not found on node {self.region}")
        return row, self._prescription(row)[1]

    def _prescription(self, row: PrescriptionRow) -> tuple[P.SignedPrescription, P.Prescription]:
        signed = P.SignedPrescription.FromString(self._store.signed_of(row))
        return signed, P.Prescription.FromString(signed.prescription)

    def _unit(self, audited: AuditedCall) -> UnitOfWork:
        return UnitOfWork(self._engine, audited, on_commit=self._records.notify)

    def _stored(
        self, row: PrescriptionRow, given: Sequence[P.Dispensation], caller: str
    ) -> P.StoredPrescription:
        signed, prescription = self._prescription(row)
        shown = state(prescription, progress_of(row), self._clock(), caller, given)
        return P.StoredPrescription(signed=signed, state=shown, region=self.region)
