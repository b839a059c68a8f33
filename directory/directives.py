"""Patient directives at the directory: stored as the patient signed them, served to the
patient and to nodes, enforced before fanning out."""

from __future__ import annotations

from sqlalchemy import Engine, bindparam, select
from sqlalchemy.orm import Session

from directory.models import DirectivesRow
from dmp.clock import now_us
from dmp.directives import PatientDirectives, verify_directives
from dmp.errors import FailedPrecondition
from dmp.prepared import prepare
from dmp.signing import SignatureVerifier
from dmp.v1 import access_pb2

_SIGNED = select(DirectivesRow.signed).where(DirectivesRow.ins == bindparam("ins"))


class DirectiveStore:
    def __init__(self, engine: Engine, signatures: SignatureVerifier) -> None:
        self._engine = engine
        self._signatures = signatures
        self._signed = prepare(_SIGNED, engine.dialect)

    def current(self, ins: str) -> tuple[PatientDirectives, bytes | None]:
        """The patient's directives and their signed form (None when never set)."""
        # Once a view: the compiled query on the driver's cursor, one statement, no BEGIN.
        with self._engine.connect() as connection:
            rows = self._signed.fetch(connection, {"ins": ins})
        signed = rows[0].signed if rows else None
        if signed is None:
            return PatientDirectives(ins), None
        message = access_pb2.SignedDirectives.FromString(signed)
        return verify_directives(self._signatures, message, ins), signed

    def verify_new(
        self, signed: access_pb2.SignedDirectives, patient_ins: str
    ) -> PatientDirectives:
        """Directives a patient signed to replace their current ones."""
        return verify_directives(self._signatures, signed, patient_ins, new=True)

    def store(
        self,
        session: Session,
        signed: access_pb2.SignedDirectives,
        directives: PatientDirectives,
    ) -> None:
        """Store a new version in the session's transaction; it must follow the current one."""
        row = session.get(DirectivesRow, directives.patient_ins)
        current = row.version if row is not None else 0
        if directives.version != current + 1:
            raise FailedPrecondition(
                f"directives version {directives.version} does not follow the current"
                f" version {current}: fetch the current directives and change them again"
            )
        blob = signed.SerializeToString()
        if row is None:
            session.add(
                DirectivesRow(
                    ins=directives.patient_ins,
                    version=directives.version,
                    signed=blob,
                    updated_us=now_us(),
                )
            )
        else:
            row.version, row.signed, row.updated_us = directives.version, blob, now_us()
