"""`dmp fhir serve`: what it refuses before it serves anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmp.cli.main import main


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--as", "node-11"], "acts for a person"),
        (["--as", "directory"], "acts for a person"),
        (["--listen", "0.0.0.0:8080"], "without --tls the gateway serves only loopback"),
        (["--listen", "192.0.2.7:8080"], "without --tls the gateway serves only loopback"),
        (["--listen", "8080"], "must be HOST:PORT"),
        (["--tls"], "--tls needs --tls-cert and --tls-key"),
        (["--tls-cert", "x.pem"], "go with --tls"),
    ],
)
def test_serve_refuses_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], said: str
) -> None:
    args = ["fhir", "serve", "--pki", str(tmp_path), "--directory", "127.0.0.1:1"]
    if "--as" not in extra:
        args += ["--as", "practitioner-10000000001"]
    assert main([*args, *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dmp: ") and said in err and len(err.splitlines()) == 1
