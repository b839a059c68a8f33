"""The federation PKI: loading a holder's credentials (CA, certificate, key) from files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dmp.errors import FailedPrecondition
from dmp.identity import Principal, Role
from dmp.pki import Pki, load_credentials
from tests.unit.pki_helpers import RPPS

# -- credentials ----------------------------------------------------------------------------


def test_load_credentials(pki: Pki) -> None:
    pki.issue_practitioner(RPPS, "nurse", "Marc Robert")
    creds = load_credentials(pki.directory, f"practitioner-{RPPS}")
    assert creds.ca_pem == pki.ca_pem_path.read_bytes()
    assert creds.cert_pem == pki.cert_path(f"practitioner-{RPPS}").read_bytes()
    assert creds.key_pem == pki.key_path(f"practitioner-{RPPS}").read_bytes()
    assert creds.principal == Principal(Role.PRACTITIONER, RPPS, "Marc Robert", "nurse")


def test_load_credentials_names_the_missing_file_and_the_command(pki: Pki) -> None:
    with pytest.raises(FailedPrecondition, match=r"node-11\.pem.*dmp pki issue node --region 11"):
        load_credentials(pki.directory, "node-11")
    pki.issue_node("11")
    pki.key_path("node-11").unlink()
    with pytest.raises(FailedPrecondition, match=r"node-11\.key.*dmp pki issue node"):
        load_credentials(pki.directory, "node-11")


def test_load_credentials_needs_only_the_ca_certificate(pki: Pki, tmp_path: Path) -> None:
    pki.issue_node("11")
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    for path in (pki.ca_pem_path, pki.cert_path("node-11"), pki.key_path("node-11")):
        shutil.copy(path, node_dir / path.name)
    assert load_credentials(node_dir, "node-11").principal == Principal(Role.NODE, "11")

    (node_dir / "ca.pem").unlink()
    with pytest.raises(FailedPrecondition, match=r"ca\.pem"):
        load_credentials(node_dir, "node-11")


def test_load_credentials_refuses_a_key_of_another_certificate(pki: Pki) -> None:
    pki.issue_node("11")
    pki.issue_node("53")
    shutil.copy(pki.key_path("node-53"), pki.key_path("node-11"))
    with pytest.raises(FailedPrecondition, match="does not match"):
        load_credentials(pki.directory, "node-11")
