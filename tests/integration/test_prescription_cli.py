"""`dmp prescription` against a real federation over mutual TLS (SQLite and PostgreSQL):
create prints the id and writes its QR code, show verifies the signature and says what
remains, find lists, dispense records, and a refusal is one `dmp:` line with its reason
and a non-zero exit."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmp.cli.main import main
from tests.integration.prescription_federation import (
    DOC,
    LINE,
    OTHER_LINE,
    RxFed,
    pharmacist,
    pharmacy,
    running_rx_federation,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ID = re.compile(r"^RX-11-[0-9A-Z]{20}$")


@pytest.fixture
def fed(pki_dir: Path, db_factory: Callable[[str], str]) -> Iterator[RxFed]:
    with running_rx_federation(pki_dir, db_factory) as federation:
        yield federation


def dmp(capsys: pytest.CaptureFixture[str], fed: RxFed, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([args[0], args[1], "--pki", str(fed.pki_dir), *args[2:]])
    out, err = capsys.readouterr()
    return code, out, err


def create(
    capsys: pytest.CaptureFixture[str], fed: RxFed, ins: str, *extra: str
) -> tuple[int, str, str]:
    return dmp(
        capsys, fed, "prescription", "create", "--as", DOC, "--node", fed.address("11"),
        "--patient", ins, "--line", LINE, "--line", OTHER_LINE, "--renewals", "1",
        "--interval-days", "28", "--organization", "Cabinet Alésia", *extra,
    )  # fmt: skip


def test_create_writes_a_png_qr_code_and_show_verifies_the_signature(
    fed: RxFed, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ins = fed.new_patient(("11",))
    qr = tmp_path / "rx.png"
    code, out, err = create(capsys, fed, ins, "--qr", str(qr))
    assert code == 0, err
    pid = out.strip()
    assert ID.match(pid), out
    data = qr.read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == height and width > 21  # a square QR code, at least version 1

    code, out, err = dmp(
        capsys, fed, "prescription", "show", pid, "--as", pharmacist("84"),
        "--directory", fed.address(),
    )  # fmt: skip
    assert code == 0, err
    assert f"prescription {pid} (held by region 11)" in out
    assert "signature    verified: signed by" in out
    assert "status       active" in out
    assert "line 0" in out and "-> 2 left at the next dispensing" in out
    assert "line 1" in out and "-> 1 left at the next dispensing" in out
    assert "next         first dispensing (line 0 x2, line 1 x1), then 1 more" in out


def test_create_writes_an_svg_qr_code(
    fed: RxFed, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ins = fed.new_patient(("11",))
    qr = tmp_path / "rx.svg"
    code, out, err = create(capsys, fed, ins, "--qr", str(qr), "--region", "11")
    assert code == 0, err
    assert ID.match(out.strip())
    root = ET.fromstring(qr.read_text())
    assert root.tag.endswith("svg")
    assert root.find(".//{http://www.w3.org/2000/svg}path") is not None


def test_find_dispense_and_a_refusal_as_one_dmp_line(
    fed: RxFed, capsys: pytest.CaptureFixture[str]
) -> None:
    ins = fed.new_patient(("11", "84"))
    code, out, err = create(capsys, fed, ins)
    assert code == 0, err
    pid = out.strip()
    code, out, err = dmp(
        capsys, fed, "prescription", "find", "--as", pharmacist("84"),
        "--directory", fed.address(), "--patient", ins,
    )  # fmt: skip
    assert code == 0, err
    assert pid in out and "active" in out
    assert "region 11: answered (1 prescriptions)" in out
    assert "region 84: answered (0 prescriptions)" in out

    code, out, err = dmp(
        capsys, fed, "prescription", "dispense", pid, "--as", pharmacist("84"),
        "--directory", fed.address(), "--pharmacy", pharmacy("84"),
        "--line", "0:2", "--not-delivered", "1:rupture de stock", "--key", "caisse-0001-a",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"{pid}: dispensed (first dispensing")
    assert "partially-dispensed; next: renewal 1 (line 0 x2, line 1 x1) from " in out

    code, out, err = dmp(
        capsys, fed, "prescription", "dispense", pid, "--as", pharmacist("53"),
        "--directory", fed.address(), "--pharmacy", pharmacy("53"),
    )  # fmt: skip
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    refused = r"^dmp: FAILED_PRECONDITION (ALREADY_DISPENSED|RENEWAL_NOT_YET_DUE): "
    assert re.match(refused, lines[0])


def test_a_malformed_line_is_one_dmp_line(fed: RxFed, capsys: pytest.CaptureFixture[str]) -> None:
    ins = fed.new_patient(("11",))
    code, out, err = dmp(
        capsys, fed, "prescription", "create", "--as", DOC, "--node", fed.address("11"),
        "--patient", ins, "--line", "not a line",
    )  # fmt: skip
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("dmp: ")


def test_cancel_then_dispense_says_it_is_cancelled(
    fed: RxFed, capsys: pytest.CaptureFixture[str]
) -> None:
    ins = fed.new_patient(("11",))
    code, out, err = create(capsys, fed, ins)
    assert code == 0, err
    pid = out.strip()
    code, out, err = dmp(
        capsys, fed, "prescription", "cancel", pid, "--as", DOC, "--directory", fed.address(),
        "--reason", "erreur de saisie",
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() == f"{pid}: cancelled: nothing more to dispense"
    code, out, err = dmp(
        capsys, fed, "prescription", "dispense", pid, "--as", pharmacist("84"),
        "--directory", fed.address(), "--pharmacy", pharmacy("84"),
    )  # fmt: skip
    assert (code, out) == (1, "")
    assert err.strip() == f"dmp: {pid}: cancelled: nothing more to dispense"
    # With the lines given, the node itself refuses, with its reason.
    code, out, err = dmp(
        capsys, fed, "prescription", "dispense", pid, "--as", pharmacist("84"),
        "--directory", fed.address(), "--pharmacy", pharmacy("84"), "--line", "0:1",
    )  # fmt: skip
    assert code == 1
    assert err.startswith("dmp: FAILED_PRECONDITION CANCELLED: ")
