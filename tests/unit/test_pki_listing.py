"""The federation PKI: what `Pki.list` and `dmp pki list` say of each certificate's validity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dmp.cli.main import main
from dmp.identity import Principal, Role
from dmp.pki import Pki
from tests.unit.pki_helpers import RPPS, read_cert


def test_expired_certificate_override(pki: Pki) -> None:
    now = datetime.now(UTC)
    pki.issue(
        Principal(Role.PRACTITIONER, RPPS, "Old Doctor", "doctor"),
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    cert = read_cert(pki.cert_path(f"practitioner-{RPPS}"))
    assert cert.not_valid_after_utc < now
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    [issued] = pki.list()
    assert issued.state() == "expired" and not issued.revoked


def test_a_not_yet_valid_certificate_is_listed_as_such(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 §11: `dmp pki list` showed a certificate valid from tomorrow as valid."""
    now = datetime.now(UTC)
    pki.issue(
        Principal(Role.PRACTITIONER, RPPS, "Future Doctor", "doctor"),
        not_before=now + timedelta(days=1),
        not_after=now + timedelta(days=30),
    )
    [issued] = pki.list()
    assert issued.state(now) == "not yet valid"
    assert issued.state(now + timedelta(days=2)) == "valid"
    assert main(["pki", "list", "--pki", str(pki.directory)]) == 0
    [_, row] = capsys.readouterr().out.splitlines()
    assert row.split()[0] == f"practitioner-{RPPS}"
    assert row.endswith("not yet valid")
