"""The witness's use cases, the same at every node and at the directory: keep a service's
new audit head (checked through the policy, kept in one unit of work with its audit
event), list the heads witnessed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import Engine

from dmp import policy, tokens
from dmp.audit.calls import Auditor
from dmp.audit.events import EventType
from dmp.audit.witness import Witnessed, WitnessStore, head_from_proto
from dmp.errors import DmpError, InvalidArgument
from dmp.identity import Role, parse_uri
from dmp.server import CallContext
from dmp.unit_of_work import UnitOfWork
from dmp.v1 import witness_pb2 as wpb

MAX_PAGE: Final = 1000


@dataclass(frozen=True, slots=True)
class WitnessedPage:
    heads: list[Witnessed]
    more: bool


class Witnessing:
    """Witness of the audit heads of the services of one role (nodes at the directory, the
    directory at a node)."""

    def __init__(
        self, engine: Engine, store: WitnessStore, auditor: Auditor, submitters: Role
    ) -> None:
        self._engine = engine
        self._store = store
        self._auditor = auditor
        self._submitters = submitters

    def witness(
        self, context: CallContext, request: wpb.WitnessTreeHeadRequest
    ) -> tuple[Witnessed, bool]:
        """Keep the caller's head if it extends the latest one kept for it; the latest head
        and whether it was already kept."""
        with self._auditor.call(context, EventType.WRITE) as audited:
            head = request.head
            audited.detail = f"witness the audit head of {head.signer}: {head.tree_size} events"
            policy.check_witness_submitter(context.principal, self._submitters)
            if not request.HasField("head"):
                raise InvalidArgument("head is required")
            checkpoint = head_from_proto(head)
            policy.check_own_head(context.principal, checkpoint.source_id)
            self._store.check(checkpoint, list(request.consistency_proof))
            with UnitOfWork(self._engine, audited) as uow:
                latest, already = self._store.accept(
                    uow.session.connection(),
                    checkpoint,
                    request.proof_from_size,
                    list(request.consistency_proof),
                )
                if already:
                    audited.detail += " (already witnessed)"
                uow.audit()
                uow.commit()
            return latest, already

    def witnessed(
        self, context: CallContext, request: wpb.ListWitnessedTreeHeadsRequest
    ) -> WitnessedPage:
        with self._auditor.call(context, EventType.READ_RECORD) as audited:
            audited.detail = f"witnessed audit heads of {request.signer}"
            policy.check_witness_reader(context.principal)
            try:
                parse_uri(request.signer)
            except DmpError:
                raise InvalidArgument(
                    f"signer {request.signer!r} is not a federation identity, e.g. urn:dmp:node:11"
                ) from None
            if request.after_tree_size < 0:
                raise InvalidArgument("after_tree_size must not be negative")
            size = tokens.page_size(request.page_size, MAX_PAGE, MAX_PAGE)
            if request.latest_only:
                latest = self._store.latest(request.signer)
                page = WitnessedPage([latest] if latest is not None else [], False)
            else:
                heads = self._store.list(request.signer, request.after_tree_size, size + 1)
                page = WitnessedPage(heads[:size], len(heads) > size)
            audited.commit()
            return page
