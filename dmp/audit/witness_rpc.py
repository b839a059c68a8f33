"""WitnessService over gRPC, served by every node and by the directory: unpack, check who
calls, call the store, audit, pack."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import grpc

from dmp.audit.calls import Auditor
from dmp.audit.events import EventType
from dmp.audit.witness import WitnessStore, head_from_proto, witnessed_to_proto
from dmp.errors import DmpError, InvalidArgument, PermissionDenied
from dmp.identity import Role, parse_uri
from dmp.server import CallContext
from dmp.v1 import witness_pb2 as wpb
from dmp.v1 import witness_pb2_grpc

WITNESS_SERVICE: Final = wpb.DESCRIPTOR.services_by_name["WitnessService"].full_name
MAX_PAGE: Final = 1000
#: Who may read witnessed heads: the services of the federation (no personal data is in a
#: head, but its sizes tell how busy a service is).
_READERS: Final = frozenset({Role.NODE, Role.DIRECTORY})


class WitnessServicer(witness_pb2_grpc.WitnessServiceServicer):
    """Witness of the audit heads of the services of one role (nodes at the directory, the
    directory at a node)."""

    def __init__(self, store: WitnessStore, auditor: Auditor, submitters: Role) -> None:
        self._store = store
        self._auditor = auditor
        self._submitters = submitters

    def WitnessTreeHead(
        self, request: wpb.WitnessTreeHeadRequest, context: CallContext
    ) -> wpb.WitnessTreeHeadResponse:
        with self._auditor.call(context, EventType.WRITE) as audited:
            head = request.head
            audited.detail = f"witness the audit head of {head.signer}: {head.tree_size} events"
            if context.principal.role is not self._submitters:
                raise PermissionDenied(
                    f"this service witnesses the audit heads of the {self._submitters.value}"
                    f" identities only, not of {context.principal.uri}"
                )
            if not request.HasField("head"):
                raise InvalidArgument("head is required")
            latest, already = self._store.accept(
                head_from_proto(head),
                request.proof_from_size,
                list(request.consistency_proof),
                context.principal,
            )
            if already:
                audited.detail += " (already witnessed)"
            audited.commit()
        return wpb.WitnessTreeHeadResponse(
            latest=witnessed_to_proto(latest), already_witnessed=already
        )

    def ListWitnessedTreeHeads(
        self, request: wpb.ListWitnessedTreeHeadsRequest, context: CallContext
    ) -> wpb.ListWitnessedTreeHeadsResponse:
        with self._auditor.call(context, EventType.READ_RECORD) as audited:
            audited.detail = f"witnessed audit heads of {request.signer}"
            if context.principal.role not in _READERS:
                raise PermissionDenied("witnessed audit heads are for the federation's services")
            try:
                parse_uri(request.signer)
            except DmpError:
                raise InvalidArgument(
                    f"signer {request.signer!r} is not a federation identity, e.g. urn:dmp:node:11"
                ) from None
            if request.page_size < 0 or request.after_tree_size < 0:
                raise InvalidArgument("page_size and after_tree_size must not be negative")
            if request.latest_only:
                latest = self._store.latest(request.signer)
                heads = [latest] if latest is not None else []
                more = False
            else:
                size = min(request.page_size or MAX_PAGE, MAX_PAGE)
                heads = self._store.list(request.signer, request.after_tree_size, size + 1)
                more = len(heads) > size
                heads = heads[:size]
            audited.commit()
        return wpb.ListWitnessedTreeHeadsResponse(
            heads=[witnessed_to_proto(h) for h in heads], more=more
        )


def add_witness_service(servicer: WitnessServicer) -> Callable[[grpc.Server], None]:
    """What a ServiceSpec adds to a server for this witness."""

    def add(server: grpc.Server) -> None:
        witness_pb2_grpc.add_WitnessServiceServicer_to_server(servicer, server)

    return add
