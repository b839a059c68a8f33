"""The audit trail of a node or of the directory: one tamper-evident log per service.

Every access to patient data, allowed or refused, becomes an :class:`AuditEvent` whose
field names follow the IHE ATNA audit message (DICOM PS3.15 A.5, FHIR AuditEvent): event,
active participants, audit source, participant objects. A security officer reads them in
the terms they know; ``dmp audit export`` hands them out as JSON lines or FHIR R4.

Event types and their codes
---------------------------

``event_type`` is our action; ``event_id`` and ``event_action_code`` follow from it
(:data:`dmp.audit.events.EVENT_TYPES`), with the codes IHE gives the matching XDS transaction:

================  =========================================  ======  =========================
event_type        event_id (system)                          action  IHE analogue
================  =========================================  ======  =========================
view              110112 Query (DCM)                         E       ITI-18 registry query
read-record       110110 Patient Record (DCM)                R       record metadata read
read-content      110106 Export (DCM)                        R       ITI-43 repository retrieve
write             110107 Import (DCM)                        C       ITI-41 provide & register
directive-change  directive-change (urn:dmp:audit-event-type)  U     patient's directives
access-history    110101 Audit Log Used (DCM)                R       audit log read
refused           110113 Security Alert (DCM)                E       refused before the action
                                                                     was known
prescription-     110107 Import (DCM)                        C       a prescription stored
  create
prescription-     110110 Patient Record (DCM)                R       one prescription read
  read
prescription-     110112 Query (DCM)                         E       a patient's prescriptions
  find
prescription-     prescription-claim (urn:dmp:audit-event-   U       a pharmacy holds it
  claim           type)
prescription-     prescription-release (same system)         U       a hold given up
  release
prescription-     prescription-dispense (same system)        C       a dispensing recorded
  dispense
prescription-     prescription-cancel (same system)          U       cancelled by its
  cancel                                                             prescriber
================  =========================================  ======  =========================

A refused access to a known action is best recorded with that action's event_type, an
``event_outcome_indicator`` of 4 (minor failure, :func:`outcome_for_status`) and the gRPC
status (e.g. ``PERMISSION_DENIED``); ``refused`` is for calls turned away before their
action could be told (unauthenticated, revoked, malformed). Another event_type needs its
``event_id`` and ``event_action_code`` given explicitly.

The log
-------

Events are appended to the table ``audit_events`` (:func:`dmp.audit.tables.audit_tables`),
numbered by ``seq`` = 1, 2, 3... without gaps. They form an RFC 6962 Merkle tree whose
entry ``seq`` is ``seq`` (8 bytes, big-endian) followed by the event's canonical JSON: its
leaf hash is ``SHA-256(0x00 ‖ seq ‖ json)``, an inner node ``SHA-256(0x01 ‖ left ‖ right)``.
Binding the position into the leaf lets a verifier tell an event that was changed from one
that was moved, and where. At a regular interval and at shutdown the service signs a
checkpoint (tree size, root, time) with its own key; ``dmp audit verify``
(:func:`dmp.audit.verify.verify_log`) recomputes everything and names the first event
changed, deleted or moved, any truncation behind a signed checkpoint and any checkpoint
whose signature is not the service's. A log rewritten with its checkpoints is caught
against the heads kept by a witness (dmp/audit/witness.py).

The package
-----------

One concept a module: ``events`` (the vocabulary and :class:`AuditEvent`), ``merkle``
(hashes and the incremental tree), ``merkle_proofs`` (consistency proofs and the leaf
subtrees a service keeps), ``tables``, ``checkpoints`` (signed tree heads), ``log``
(:class:`AuditLog` and its group commit), ``verify`` (:func:`verify_log`), ``fhir`` (the
JSON-lines and FHIR R4 export), ``calls`` (the audit of each gRPC call), ``refusals``
(counted refusals of unauthenticated callers) and ``witness*`` (the witness that
co-signs other services' checkpoints, its client, its service and its check). The purpose
of an access is :class:`dmp.purposes.Purpose`. Import from the module that defines a
name; the few names below are re-exported for convenience.
"""

from dmp.audit.events import AuditEvent, EventType, Outcome
from dmp.audit.log import AuditLog
from dmp.audit.verify import verify_log

__all__ = ["AuditEvent", "AuditLog", "EventType", "Outcome", "verify_log"]
