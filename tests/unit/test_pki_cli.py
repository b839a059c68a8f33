"""The federation PKI from the command line: `dmp pki init|issue|revoke|list`."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmp.cli.main import main
from tests.unit.pki_helpers import INS, RPPS, WRONG_KEY_INS, dns_and_ips, file_mode, read_cert

# -- the command line -----------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMP_PKI", raising=False)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dmp: ")
    return lines[0]


@pytest.mark.usefixtures("no_env")
def test_cli_init_issue_revoke_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--pki", d]) == 0
    assert "ca.key" in capsys.readouterr().out
    assert file_mode(tmp_path / "pki" / "ca.key") == 0o600

    assert (
        main(["pki", "issue", "node", "--region", "11", "--host", "n11.example.org", "--pki", d])
        == 0
    )
    out = capsys.readouterr().out
    assert "urn:dmp:node:11" in out and str(tmp_path / "pki" / "node-11.pem") in out
    assert dns_and_ips(read_cert(tmp_path / "pki" / "node-11.pem")) == (
        ["n11.example.org", "node-11.dmp.internal"],
        [],
    )

    assert main(["pki", "issue", "directory", "--pki", d, "--days", "30"]) == 0
    assert "urn:dmp:directory" in capsys.readouterr().out
    assert dns_and_ips(read_cert(tmp_path / "pki" / "directory.pem")) == (
        ["localhost"],
        ["127.0.0.1"],
    )

    args = ["--rpps", RPPS, "--profession", "midwife", "--name", "Anne Roux", "--pki", d]
    assert main(["pki", "issue", "practitioner", *args]) == 0
    assert f"urn:dmp:practitioner:{RPPS}" in capsys.readouterr().out

    assert main(["pki", "issue", "patient", "--ins", INS, "--name", "Jean Dupont", "--pki", d]) == 0
    assert f"urn:dmp:patient:{INS}" in capsys.readouterr().out

    assert main(["pki", "revoke", "--pki", d, f"patient-{INS}"]) == 0
    capsys.readouterr()

    assert main(["pki", "list", "--pki", d]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["IDENTITY", "URI", "PROFESSION", "EXPIRES", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == sorted(rows)
    assert rows["node-11"][1:3] == ["urn:dmp:node:11", "-"]
    assert rows["node-11"][4] == "valid"
    assert rows[f"practitioner-{RPPS}"][2] == "midwife"
    assert rows[f"patient-{INS}"][4] == "revoked"
    expiry = read_cert(tmp_path / "pki" / "directory.pem").not_valid_after_utc.date().isoformat()
    assert rows["directory"][3] == expiry


def test_cli_pki_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DMP_PKI", str(tmp_path / "env-pki"))
    assert main(["pki", "init"]) == 0
    assert main(["pki", "issue", "node", "--region", "53"]) == 0
    assert (tmp_path / "env-pki" / "node-53.pem").is_file()


@pytest.mark.usefixtures("no_env")
def test_cli_requires_pki_without_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["pki", "list"])
    assert exit_info.value.code == 2
    assert "--pki" in capsys.readouterr().err


@pytest.mark.usefixtures("no_env")
def test_cli_second_init_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--pki", d]) == 0
    capsys.readouterr()
    assert main(["pki", "init", "--pki", d]) == 1
    assert "already holds a federation CA" in _one_line_error(capsys)


@pytest.mark.usefixtures("no_env")
def test_cli_missing_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "issue", "directory", "--pki", str(tmp_path)]) == 1
    assert f"run `dmp pki init --pki {tmp_path}` first" in _one_line_error(capsys)
    assert main(["pki", "list", "--pki", str(tmp_path)]) == 1
    assert "no federation CA" in _one_line_error(capsys)


@pytest.mark.usefixtures("no_env")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node", "--region", "99"], "unknown region code '99'"),
        (
            ["practitioner", "--rpps", "1000345678", "--profession", "doctor", "--name", "X"],
            "11 digits",
        ),
        (
            ["practitioner", "--rpps", RPPS, "--profession", "surgeon", "--name", "X"],
            "unknown profession",
        ),
        (["patient", "--ins", WRONG_KEY_INS, "--name", "X"], "wrong key"),
    ],
)
def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--pki", d]) == 0
    capsys.readouterr()
    assert main(["pki", "issue", *args, "--pki", d]) == 1
    assert message in _one_line_error(capsys)
    assert sorted(p.name for p in (tmp_path / "pki").glob("*.pem")) == ["ca.pem", "crl.pem"]


@pytest.mark.usefixtures("no_env")
def test_cli_revoke_unknown_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--pki", d]) == 0
    capsys.readouterr()
    assert main(["pki", "revoke", "--pki", d, "node-11"]) == 1
    assert "no certificate for 'node-11'" in _one_line_error(capsys)
