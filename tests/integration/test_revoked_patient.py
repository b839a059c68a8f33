"""Issue 9 §9: a revoked patient certificate (a lost card) locks nobody out.

The directives the patient signed while the certificate was valid stay in force (the CRL
says when it was revoked); professionals are served as those directives say, emergency
included; a new certificate for the same INS reads and replaces them; the revoked key can
sign nothing new, even dated from before its revocation. Over real mutual TLS, with a PKI
of this test's own (it revokes a patient).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import grpc
import pytest

from dmp.clock import from_us
from dmp.directives import PatientDirectives, sign_directives, verify_directives
from dmp.pki import CRL_FILE, Pki, RevocationList, load_credentials
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import access_pb2
from dmp.v1 import directory_service_pb2 as dpb
from dmp.v1 import node_service_pb2 as npb
from tests.federation import (
    DOCTOR,
    OTHER_DOCTOR,
    PATIENT,
    Client,
    client,
    draft,
    make_pki,
    running_directory,
    running_node,
    wait_for,
)

EMERGENCY_DOCTOR = "10000000011"
ME = f"patient-{PATIENT}"
REASON = "unconscious patient, admitted to the emergency room"


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def view(c: Client, reason: str = "") -> dpb.GetConsolidatedViewResponse:
    return c.directory.GetConsolidatedView(
        dpb.GetConsolidatedViewRequest(patient_ins=PATIENT),
        metadata=c.md(reason=reason),
        timeout=10,
    )


def test_a_revoked_patient_certificate_locks_nobody_out(
    tmp_path: Path, db_factory: Callable[[str], str]
) -> None:
    pki_dir = tmp_path / "pki"
    pki: Pki = make_pki(pki_dir)
    pki.issue_practitioner(EMERGENCY_DOCTOR, "doctor", "Dr Urgence")
    ca = pki.ca_certificate
    signatures = SignatureVerifier(ca, RevocationList(pki_dir / CRL_FILE, ca, check_interval=0))
    with (
        running_directory(pki_dir, db_factory("directory"), health_interval=0.2) as directory,
        running_node(
            pki_dir, "11", db_factory("node-11"), directory=f"127.0.0.1:{directory.port}"
        ) as node,
    ):
        wait_for(lambda: any(r.healthy for r in directory.discovery.routes().values()), "node")
        at_directory: dict[str, Client] = {}

        def dir_client(identity: str) -> Client:
            if identity not in at_directory:
                at_directory[identity] = client(pki_dir, identity, directory.port)
            return at_directory[identity]

        doctor = dir_client(f"practitioner-{DOCTOR}")
        blocked = dir_client(f"practitioner-{OTHER_DOCTOR}")
        urgent = dir_client(f"practitioner-{EMERGENCY_DOCTOR}")
        at_node = client(pki_dir, f"practitioner-{DOCTOR}", node.port)
        try:
            stored = at_node.node.PutRecord(
                npb.PutRecordRequest(record=draft(), content=b"report"), timeout=10
            ).record
            wait_for(lambda: bool(directory.index.fragments(PATIENT)), "the locator")

            # The patient, with the card they will lose, blocks a doctor.
            old_card = Signer(load_credentials(pki_dir, ME))
            first = PatientDirectives(PATIENT, version=1, blocked_rpps=frozenset({OTHER_DOCTOR}))
            patient = dir_client(ME)
            patient.directory.SetDirectives(
                dpb.SetDirectivesRequest(directives=sign_directives(old_card, first)), timeout=10
            )
            assert [r.id for r in view(doctor).records] == [stored.id]
            assert code_of(lambda: view(blocked)) == grpc.StatusCode.PERMISSION_DENIED

            # The card is lost: the CA revokes it, and the servers read the new CRL.
            before_the_loss = datetime.now(UTC)
            pki.revoke(ME)
            wait_for(
                lambda: code_of(lambda: view(patient)) == grpc.StatusCode.UNAUTHENTICATED,
                "the directory to read the new CRL",
            )
            old_at_node = client(pki_dir, ME, node.port)
            wait_for(
                lambda: (
                    code_of(
                        lambda: old_at_node.node.ListRecords(
                            npb.ListRecordsRequest(patient_ins=PATIENT),
                            metadata=old_at_node.md(),
                            timeout=10,
                        )
                    )
                    == grpc.StatusCode.UNAUTHENTICATED
                ),
                "the node to read the new CRL",
            )
            old_at_node.close()

            # Professionals are served as the directives signed before say, emergency too.
            answer = view(doctor)
            assert [r.id for r in answer.records] == [stored.id]
            assert [s.state for s in answer.regions] == [dpb.REGION_STATE_ANSWERED]
            assert [r.id for r in view(urgent, REASON).records] == [stored.id]
            err = refusal(lambda: view(blocked))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "blocked" in (err.details() or "")
            listed = at_node.node.ListRecords(  # direct: the node asks the directory
                npb.ListRecordsRequest(patient_ins=PATIENT), metadata=at_node.md(), timeout=10
            )
            assert [r.id for r in listed.records] == [stored.id]

            # A new card for the same INS reads the directives and replaces them.
            pki.issue_patient(PATIENT, "Jean DUPONT")
            renewed = client(pki_dir, ME, directory.port)
            answer_d = renewed.directory.GetDirectives(
                dpb.GetDirectivesRequest(patient_ins=PATIENT), timeout=10
            )
            current = verify_directives(signatures, answer_d.directives, PATIENT)
            assert current == first
            assert [r.id for r in view(renewed).records] == [stored.id]

            # The lost card signs nothing new: not now, not dated from before it was lost.
            later = PatientDirectives(PATIENT, version=2)
            for signed in (
                sign_directives(old_card, later),
                _backdated(old_card, later, before_the_loss),
            ):
                request = dpb.SetDirectivesRequest(directives=signed)
                err = refusal(partial(renewed.directory.SetDirectives, request, timeout=10))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "revoked" in (err.details() or "")

            new_card = Signer(load_credentials(pki_dir, ME))
            stored_version = renewed.directory.SetDirectives(
                dpb.SetDirectivesRequest(directives=sign_directives(new_card, later)), timeout=10
            ).version
            assert stored_version == 2
            assert [r.id for r in view(blocked).records] == [stored.id]  # unblocked
            renewed.close()
        finally:
            at_node.close()
            for c in at_directory.values():
                c.close()


def _backdated(
    signer: Signer, directives: PatientDirectives, when: datetime
) -> access_pb2.SignedDirectives:
    """Directives signed now, dated `when`."""
    message = directives.to_proto()
    message.issued_at.CopyFrom(from_us(int(when.timestamp() * 1_000_000)))
    payload = message.SerializeToString()
    return access_pb2.SignedDirectives(
        directives=payload, signature=signer.sign(payload), certificate=signer.certificate_der
    )
