"""Issue 4 §6 over mutual TLS: each way an access assertion can be wrong, checked by a
node and by the directory, and an emergency assertion carried as such.
Helpers: access_federation.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import grpc
import pytest

from dmp.assertion import (
    ASSERTION_KEY,
    AUDIENCE,
    MAX_LIFETIME_US,
    AssertionVerifier,
    Metadata,
    sign_assertion,
)
from dmp.clock import from_us, now_us
from dmp.errors import InvalidArgument
from dmp.pki import CRL_FILE, RevocationList, certificate_from_pem, load_credentials
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import access_pb2, node_service_pb2_grpc
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from tests.access_rules import DENIED, THE_PATIENT
from tests.federation import LOOKUP, OTHER_DOCTOR, PATIENT, READ_CONTENT, READ_RECORD, VIEW
from tests.integration.access_federation import (
    ALL_REGIONS,
    DIRECTORY,
    DOC,
    EXPIRED,
    NOT_FOUND,
    OK,
    OTHER,
    REASON,
    UNAUTHENTICATED,
    Fed,
    Target,
    check_view,
    code_of,
    patient_identity,
    practitioner,
    record,
    refusal,
)


@dataclass(frozen=True)
class Use:
    """What an assertion is signed for: an operation, and the record of a record read."""

    operation: access_pb2.Operation.ValueType = VIEW
    record_id: str = ""


def forge(
    signer: Signer,
    ins: str,
    *,
    subject: str | None = None,
    purpose: access_pb2.Purpose.ValueType = access_pb2.PURPOSE_CARE,
    reason: str = "",
    issued_us: int | None = None,
    lifetime_us: int = 60_000_000,
    audience: str = AUDIENCE,
    nonce: bytes | None = None,
    use: Use | None = None,
) -> Metadata:
    """An assertion built by hand, signed by `signer` with its own certificate."""
    issued = now_us() if issued_us is None else issued_us
    assertion = access_pb2.AccessAssertion(
        subject=signer.principal.uri if subject is None else subject,
        patient_ins=ins,
        purpose=purpose,
        reason=reason,
        issued_at=from_us(issued),
        expires_at=from_us(issued + lifetime_us),
        nonce=os.urandom(16) if nonce is None else nonce,
        audience=audience,
        operation=(use or Use()).operation,
        record_id=(use or Use()).record_id,
    )
    payload = assertion.SerializeToString()
    signed = access_pb2.SignedAssertion(
        assertion=payload, signature=signer.sign(payload), certificate=signer.certificate_der
    )
    return ((ASSERTION_KEY, signed.SerializeToString()),)


def signed_of(md: Metadata) -> access_pb2.SignedAssertion:
    [(key, value)] = md
    assert key == ASSERTION_KEY and isinstance(value, bytes)
    return access_pb2.SignedAssertion.FromString(value)


def resigned(md: Metadata, key: Signer) -> Metadata:
    """The same assertion and certificate, the signature made by another key."""
    signed = signed_of(md)
    signed.signature = key.sign(signed.assertion)
    return ((ASSERTION_KEY, signed.SerializeToString()),)


def altered(md: Metadata) -> Metadata:
    """The assertion changed after it was signed (signature and certificate kept)."""
    signed = signed_of(md)
    assertion = access_pb2.AccessAssertion.FromString(signed.assertion)
    assertion.purpose = access_pb2.PURPOSE_EMERGENCY
    assertion.reason = "added after signing"
    signed.assertion = assertion.SerializeToString()
    return ((ASSERTION_KEY, signed.SerializeToString()),)


# -- 2. each way an assertion can be wrong -------------------------------------------------

Build = Callable[[Fed, str, Use], Metadata]


def _valid(fed: Fed, ins: str, use: Use) -> Metadata:
    return fed.md(DOC, ins, op=use.operation, record_id=use.record_id)


def _exactly_five_minutes(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, lifetime_us=MAX_LIFETIME_US)


def _emergency(fed: Fed, ins: str, use: Use) -> Metadata:
    return fed.md(DOC, ins, REASON, op=use.operation, record_id=use.record_id)


def _another_key(fed: Fed, ins: str, use: Use) -> Metadata:
    return resigned(fed.md(DOC, ins, op=use.operation, record_id=use.record_id), fed.signer(OTHER))


def _altered(fed: Fed, ins: str, use: Use) -> Metadata:
    return altered(fed.md(DOC, ins, op=use.operation, record_id=use.record_id))


def _subject_not_signer(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, subject=f"urn:dmp:practitioner:{OTHER_DOCTOR}")


def _expired(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(
        fed.signer(DOC), ins, use=use, issued_us=now_us() - 400_000_000, lifetime_us=120_000_000
    )


def _slow_clock(fed: Fed, ins: str, use: Use) -> Metadata:
    """Signed "now" by a client whose clock is 2 minutes behind, for 60 s."""
    return forge(fed.signer(DOC), ins, use=use, issued_us=now_us() - 120_000_000)


def _too_long(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, lifetime_us=MAX_LIFETIME_US + 1_000_000)


def _future(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, issued_us=now_us() + 300_000_000)


def _another_patient(fed: Fed, ins: str, use: Use) -> Metadata:
    return fed.md(DOC, PATIENT, op=use.operation, record_id=use.record_id)


def _audience(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, audience="urn:dmp:elsewhere")


def _emergency_without_reason(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, purpose=access_pb2.PURPOSE_EMERGENCY, reason="  ")


def _no_purpose(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, purpose=access_pb2.PURPOSE_UNSPECIFIED)


def _patient_care(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(patient_identity(ins)), ins, use=use, purpose=access_pb2.PURPOSE_CARE)


def _professional_self(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, purpose=access_pb2.PURPOSE_SELF)


def _short_nonce(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DOC), ins, use=use, nonce=os.urandom(8))


def _malformed(fed: Fed, ins: str, use: Use) -> Metadata:
    return ((ASSERTION_KEY, b"\xff\x00 not a SignedAssertion"),)


def _missing(fed: Fed, ins: str, use: Use) -> Metadata:
    return ()


def _foreign(fed: Fed, ins: str, use: Use) -> Metadata:
    return sign_assertion(fed.foreign, ins, operation=use.operation, record_id=use.record_id)


def _expired_certificate(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(practitioner(EXPIRED)), ins, use=use)


def _directory_signs(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer(DIRECTORY), ins, use=use)


def _node_signs(fed: Fed, ins: str, use: Use) -> Metadata:
    return forge(fed.signer("node-53"), ins, use=use)


@dataclass(frozen=True)
class Wrong:
    name: str
    build: Build
    #: Who carries it to node 11 and to the directory (THE_PATIENT: the test's patient).
    to_node: str
    to_directory: str | None
    code: grpc.StatusCode
    #: A word of the refusal that says why.
    why: str = ""


UA = UNAUTHENTICATED
WRONG = [
    # Right ones first: the path works, so the refusals below come from the assertion.
    Wrong("valid", _valid, DOC, DOC, OK),
    Wrong("valid-relayed-by-the-directory", _valid, DIRECTORY, None, OK),
    Wrong("lifetime-exactly-5-minutes", _exactly_five_minutes, DOC, DOC, OK),
    Wrong("emergency-with-a-reason", _emergency, DOC, DOC, OK),
    Wrong("signed-by-another-key", _another_key, DOC, DOC, UA, "signature"),
    Wrong("changed-after-signing", _altered, DOC, DOC, UA, "signature"),
    Wrong("subject-is-not-the-signer", _subject_not_signer, DOC, DOC, UA, "someone else"),
    Wrong("client-clock-2-minutes-slow", _slow_clock, DOC, DOC, OK),
    Wrong("expired", _expired, DOC, DOC, UA, "check your clock"),
    Wrong("lives-over-5-minutes", _too_long, DOC, DOC, UA, "5 minutes"),
    Wrong("issued-in-the-future", _future, DOC, DOC, UA, "future"),
    Wrong("for-another-patient", _another_patient, DOC, DOC, DENIED, "another patient"),
    Wrong("audience-wrong", _audience, DOC, DOC, UA, "elsewhere"),
    Wrong("emergency-without-reason", _emergency_without_reason, DOC, DOC, UA, "reason"),
    Wrong("no-purpose", _no_purpose, DOC, DOC, UA, "purpose"),
    Wrong("patient-signs-care", _patient_care, THE_PATIENT, THE_PATIENT, UA, "SELF"),
    Wrong("professional-signs-self", _professional_self, DOC, DOC, UA, "SELF"),
    Wrong("nonce-too-short", _short_nonce, DOC, DOC, UA, "malformed"),
    Wrong("malformed", _malformed, DOC, DOC, UA, "malformed"),
    Wrong("missing", _missing, DOC, DOC, UA, "no access assertion"),
    Wrong("certificate-of-another-ca", _foreign, DOC, DOC, UA, "federation CA"),
    Wrong("certificate-expired", _expired_certificate, DIRECTORY, DOC, UA, "valid now"),
    Wrong("someone-elses-assertion", _valid, OTHER, OTHER, DENIED, "its signer"),
    Wrong("relayed-by-a-node", _valid, "node-53", "node-53", DENIED, "its signer"),
    Wrong("directory-identity-alone", _missing, DIRECTORY, DIRECTORY, UA, "no access"),
    Wrong("signed-by-the-directory", _directory_signs, DIRECTORY, DIRECTORY, UA, "only"),
    Wrong("signed-by-a-node", _node_signs, "node-53", "node-53", UA, "only"),
]


def _carrier(who: str, ins: str) -> str:
    return patient_identity(ins) if who == THE_PATIENT else who


@pytest.mark.parametrize("wrong", [pytest.param(w, id=w.name) for w in WRONG])
def test_assertion_checked_by_the_node(fed: Fed, target: Target, wrong: Wrong) -> None:
    stub = fed.node(_carrier(wrong.to_node, target.ins), "11")
    request = npb.ListRecordsRequest(patient_ins=target.ins)

    def list_records() -> npb.ListRecordsResponse:
        return stub.ListRecords(request, metadata=wrong.build(fed, target.ins, Use()), timeout=10)

    def get_record() -> npb.GetRecordResponse:
        return stub.GetRecord(
            npb.GetRecordRequest(record_id=target.doc.id),
            metadata=wrong.build(fed, target.ins, Use(READ_RECORD, target.doc.id)),
            timeout=10,
        )

    if wrong.code == OK:
        assert [r.id for r in list_records().records] == [target.doc.id]
        assert get_record().record.id == target.doc.id
        return
    err = refusal(list_records)
    assert err.code() == wrong.code, err.details()
    assert wrong.why in (err.details() or "")
    # By id, a refused assertion gives nothing either (for another patient: not among theirs).
    expected = NOT_FOUND if wrong.name == "for-another-patient" else wrong.code
    assert code_of(get_record) == expected


@pytest.mark.parametrize(
    "wrong", [pytest.param(w, id=w.name) for w in WRONG if w.to_directory is not None]
)
def test_assertion_checked_by_the_directory(fed: Fed, target: Target, wrong: Wrong) -> None:
    assert wrong.to_directory is not None
    stub = fed.dir(_carrier(wrong.to_directory, target.ins))
    calls: dict[str, Callable[[], object]] = {
        "view": lambda: stub.GetConsolidatedView(
            dpb.GetConsolidatedViewRequest(patient_ins=target.ins),
            metadata=wrong.build(fed, target.ins, Use()),
            timeout=10,
        ),
        "patient": lambda: stub.GetPatient(
            dpb.GetPatientRequest(ins=target.ins),
            metadata=wrong.build(fed, target.ins, Use(LOOKUP)),
            timeout=10,
        ),
    }
    if wrong.code == OK:
        view = calls["view"]()
        assert isinstance(view, dpb.GetConsolidatedViewResponse)
        check_view(view, {target.doc.id, target.rx.id})
        assert code_of(calls["patient"]) == OK
        return
    for name, call in calls.items():
        err = refusal(call)
        assert err.code() == wrong.code, (name, err.details())
        assert wrong.why in (err.details() or ""), name


def test_the_directory_identity_alone_reads_nothing_at_any_node(fed: Fed, target: Target) -> None:
    def content(stub: node_service_pb2_grpc.NodeServiceStub, metadata: Metadata) -> object:
        request = npb.GetRecordContentRequest(record_id=target.doc.id)
        return list(stub.GetRecordContent(request, metadata=metadata, timeout=10))

    for region in ALL_REGIONS:
        stub = fed.node(DIRECTORY, region)
        for forged in (False, True):

            def metadata(use: Use, forged: bool = forged) -> Metadata:
                return forge(fed.signer(DIRECTORY), target.ins, use=use) if forged else ()

            calls: list[Callable[[], object]] = [
                partial(
                    stub.ListRecords,
                    npb.ListRecordsRequest(patient_ins=target.ins),
                    metadata=metadata(Use()),
                    timeout=10,
                ),
                partial(
                    stub.GetRecord,
                    npb.GetRecordRequest(record_id=target.doc.id),
                    metadata=metadata(Use(READ_RECORD, target.doc.id)),
                    timeout=10,
                ),
                partial(content, stub, metadata(Use(READ_CONTENT, target.doc.id))),
            ]
            for call in calls:
                assert code_of(call) == UNAUTHENTICATED, region


# -- emergency --------------------------------------------------------------------------------


def test_an_emergency_access_is_granted_and_carried_as_such(fed: Fed) -> None:
    ins = fed.new_patient()
    doc = fed.put("84", record(ins, f"er-{ins}"))
    fed.wait_fragments(ins, {"84": 1})
    md = fed.md(OTHER, ins, REASON)
    ca = certificate_from_pem(load_credentials(fed.pki_dir, OTHER).ca_pem)
    verifier = AssertionVerifier(SignatureVerifier(ca, RevocationList(fed.pki_dir / CRL_FILE, ca)))
    verified = verifier.verify(md, VIEW)  # what the servers see
    assert verified.emergency and verified.purpose_name == "EMERGENCY"
    assert verified.reason == REASON
    view = fed.dir(OTHER).GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=ins), metadata=md, timeout=10
    )
    check_view(view, {doc.id})
    # The helper sign_assertion itself refuses an emergency without a reason.
    with pytest.raises(InvalidArgument, match="reason"):
        sign_assertion(fed.signer(OTHER), ins, access_pb2.PURPOSE_EMERGENCY, " ", operation=VIEW)
