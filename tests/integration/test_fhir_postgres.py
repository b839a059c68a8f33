"""Issue 12, the read half, on PostgreSQL: the same gateway over a directory and nodes
whose databases are PostgreSQL, searched, paged and read by fhirclient."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fhirclient import client as fhir_client
from fhirclient.models.documentreference import DocumentReference

from tests.federation import PATIENT
from tests.integration.fhir_federation import (
    DOC,
    INS_SYSTEM,
    RECORDS,
    FhirFed,
    running_fhir_federation,
    sha256,
    validate,
)
from tests.postgres import PostgresCluster


@pytest.fixture
def pg_fed(tmp_path: Path, postgres_cluster: PostgresCluster) -> Iterator[FhirFed]:
    made: list[str] = []

    def db(name: str) -> str:
        database = f"t_{uuid.uuid4().hex[:12]}_{name}".replace("-", "_")
        made.append(database)
        return str(postgres_cluster.create_database(database))

    try:
        with running_fhir_federation(tmp_path, db) as fed:
            yield fed
    finally:
        for database in made:
            postgres_cluster.drop_database(database)


def test_search_page_and_read_on_postgresql(pg_fed: FhirFed) -> None:
    gateway = pg_fed.gateway(DOC)
    smart = fhir_client.FHIRClient(settings={"app_id": "hospital", "api_base": gateway.base})
    search = DocumentReference.where(
        struct={"patient.identifier": f"{INS_SYSTEM}|{PATIENT}", "_count": "5"}
    )
    pages = list(search.perform_iter(smart.server))
    assert len(pages) == 2
    documents = [entry.resource for page in pages for entry in page.entry]
    assert len(documents) == len(RECORDS)
    for document in documents:
        validate(document.as_json())
        _, record, content = pg_fed.written[document.identifier[0].value]
        body = smart.server.session.get(document.content[0].attachment.url, timeout=30).content
        assert body == content and sha256(body) == record.sha256
