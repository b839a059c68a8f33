"""FHIR input an attacker or a broken exporter sends, without servers: each a refusal
naming what is wrong, never an exception out of the gateway or of `dmp fhir import`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmp.fhir.errors import FhirError
from dmp.fhir.files import bundle_files, import_bundles
from dmp.fhir.transaction import parse
from tests.integration.fhir_bundles import ins_number, submission


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


def _set(bundle: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = bundle
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("resource", "extension"), -1),
        (("resource", "extension", 0, "url"), None),
        (("resource", "gender"), []),
        (("resource", "name", 0, "given"), -1),
        (("resource", "securityLabel"), "x"),
        (("resource", "securityLabel", 0, "coding", 0, "code"), []),
        (("resource", "type"), "x"),
        (("resource", "content", 0, "attachment", "extension"), -1),
    ],
)
def test_an_element_of_the_wrong_json_type_is_a_400_naming_its_entry(
    path: tuple[Any, ...], value: Any
) -> None:
    """A string where FHIR wants an object (or a number where it wants a list) was a
    TypeError or AttributeError out of the checks: a 500 with a traceback, no element."""
    bundle = submission(ins_number(61), "types")
    kind = "Patient" if path[1] in ("extension", "gender", "name") else "DocumentReference"
    index = next(i for i, e in enumerate(bundle["entry"]) if e["resource"]["resourceType"] == kind)
    _set(bundle["entry"][index], path, value)
    with pytest.raises(FhirError) as refused:
        parse(bundle, max_content=20 * 1024 * 1024)
    assert refused.value.status == 400
    assert (refused.value.expression or "").startswith(f"Bundle.entry[{index}]")
