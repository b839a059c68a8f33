"""Relaying a person's call to the node of a region: the route, what travels with the call,
and the node's error passed on as it came."""

from __future__ import annotations

import grpc

from dmp.assertion import ASSERTION_KEY, VerifiedAssertion
from dmp.audit.calls import REQUEST_ID_KEY
from dmp.directives import DIRECTIVES_KEY, NO_DIRECTIVES_KEY
from dmp.discovery import Discovery
from dmp.errors import DmpError, FailedPrecondition, NotFound

Metadata = tuple[tuple[str, str | bytes], ...]


def relayed_error(region: str, exc: grpc.RpcError) -> DmpError:
    """A node's error on a relayed call, passed on with its status code."""
    error = DmpError(f"region {region}: {exc.details()}")
    error.code = exc.code()
    error.reason = exc.code().name
    return error


def forward_metadata(
    assertion: VerifiedAssertion, signed_directives: bytes | None, request_id: str
) -> Metadata:
    """What the directory passes to nodes: the caller's assertion unchanged, the patient's
    directives as the patient signed them, and the request id its audit event carries."""
    metadata: Metadata = (
        (ASSERTION_KEY, assertion.raw),
        (REQUEST_ID_KEY, request_id),
    )
    if signed_directives is not None:
        metadata += ((DIRECTIVES_KEY, signed_directives),)
    else:  # what GetDirectives would answer: saves each node a round trip back
        metadata += ((NO_DIRECTIVES_KEY, "1"),)
    return metadata


def node_address(discovery: Discovery, region: str) -> str:
    """The address of the node serving `region`, when it is registered and reachable."""
    route = discovery.routes().get(region)
    if route is None:
        raise NotFound(f"no node is registered for region {region!r}")
    if not route.healthy:
        raise FailedPrecondition(
            f"region {region} is not reachable now ({route.reason}): retry later"
        )
    return route.address
