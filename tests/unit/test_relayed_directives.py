"""Directives relayed by the directory: the verdict on the same relayed bytes is reused,
never for another patient, and never past the staleness bound."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from dmp.directives import DIRECTIVES_KEY, PatientDirectives, sign_directives, verify_directives
from dmp.ins import make_ins
from dmp.pki import CRL_FILE, Pki, RevocationList, load_credentials
from dmp.signing import SignatureVerifier, Signer
from dmp.v1 import access_pb2
from node.directives import STALENESS_SECONDS, DirectiveCache

PATIENT = make_ins("1850275123456")
OTHER = make_ins("2850275123457")


@pytest.fixture
def rig(tmp_path: Path) -> tuple[DirectiveCache, bytes]:
    pki = Pki.init(tmp_path / "pki")
    pki.issue_patient(PATIENT, "Jean DUPONT")
    ca = pki.ca_certificate
    signatures = SignatureVerifier(ca, RevocationList(tmp_path / "pki" / CRL_FILE, ca))
    card = Signer(load_credentials(tmp_path / "pki", f"patient-{PATIENT}"))
    signed = sign_directives(card, PatientDirectives(PATIENT, version=3, emergency_refused=True))
    return DirectiveCache(signatures, None), signed.SerializeToString()


def test_the_same_relayed_bytes_are_verified_once_within_the_bound(
    rig: tuple[DirectiveCache, bytes],
) -> None:
    cache, raw = rig
    with (
        mock.patch("node.directives.verify_directives", wraps=verify_directives) as verify,
        mock.patch.object(
            access_pb2.SignedDirectives,
            "FromString",
            wraps=access_pb2.SignedDirectives.FromString,
        ) as parse,
    ):
        for _ in range(5):
            got = cache.get(PATIENT, [(DIRECTIVES_KEY, raw)])
            assert got.version == 3 and got.emergency_refused
    assert verify.call_count == 1
    assert parse.call_count == 1


def test_relayed_bytes_of_one_patient_never_serve_another(
    rig: tuple[DirectiveCache, bytes],
) -> None:
    cache, raw = rig
    assert cache.get(PATIENT, [(DIRECTIVES_KEY, raw)]).version == 3
    # Refused (and ignored) for the other patient: their defaults, not this set.
    other = cache.get(OTHER, [(DIRECTIVES_KEY, raw)])
    assert other.patient_ins == OTHER and other.version == 0


def test_a_verdict_older_than_the_bound_is_verified_again(
    rig: tuple[DirectiveCache, bytes],
) -> None:
    cache, raw = rig
    now = [1000.0]
    with (
        mock.patch("node.directives.time.monotonic", lambda: now[0]),
        mock.patch("node.directives.verify_directives", wraps=verify_directives) as verify,
    ):
        cache.get(PATIENT, [(DIRECTIVES_KEY, raw)])
        now[0] += STALENESS_SECONDS + 1
        cache.get(PATIENT, [(DIRECTIVES_KEY, raw)])
    assert verify.call_count == 2
