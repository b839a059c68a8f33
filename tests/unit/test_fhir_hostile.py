"""FHIR input an attacker or a broken exporter sends, without servers: each a refusal
naming what is wrong, never an exception out of the gateway or of `dmp fhir import`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from dmp.fhir.files import bundle_files, import_bundles


def test_import_of_a_directory_with_a_deeply_nested_file_refuses_that_file_only(
    tmp_path: Path,
) -> None:
    """A RecursionError out of the JSON parser stopped the whole import: no summary, a
    traceback, the files after it never tried."""
    (tmp_path / "a-nested.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (tmp_path / "b-not-a-bundle.json").write_text("{}")
    writer = SimpleNamespace(signer=SimpleNamespace(principal=SimpleNamespace(uri="urn:dmp:x")))
    summary = import_bundles(bundle_files(tmp_path), node=writer)  # type: ignore[arg-type]
    assert summary.files == 2 and summary.stored == 0
    [(first, why), (second, _)] = summary.refused
    assert first.endswith("a-nested.json") and "HTTP 400" in why and "deep" in why
    assert second.endswith("b-not-a-bundle.json")
