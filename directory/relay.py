"""Relaying a person's call to the node of a region: the route, what travels with the call,
and the node's error passed on as it came."""

from __future__ import annotations

import grpc

from dmp.assertion import ASSERTION_KEY, VerifiedAssertion
from dmp.audit.calls import REQUEST_ID_KEY
from dmp.directives import DIRECTIVES_KEY, NO_DIRECTIVES_KEY
from dmp.discovery import Discovery
from dmp.errors import DmpError, FailedPrecondition, NotFound, Unavailable
from dmp.regions import region_name
from dmp.server import error_reason

Metadata = tuple[tuple[str, str | bytes], ...]


def relayed_error(region: str, exc: grpc.RpcError) -> DmpError:
    """A node's error on a relayed call, passed on with its status code."""
    error = DmpError(f"region {region}: {exc.details()}")
    error.code = exc.code()
    error.reason = exc.code().name
    return error


def passed_on(region: str, exc: grpc.RpcError) -> DmpError:
    """A node's answer to a relayed act, passed on to the caller as the node gave it: its
    status, its message and its ErrorInfo reason (a pharmacist's software acts on
    ALREADY_DISPENSED whichever way it reached the node). A failure to reach the node (no
    reason: the transport's, not the node's) is UNAVAILABLE naming the region."""
    reason = error_reason(exc)
    code = exc.code()
    if reason is None and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return unreachable(region, "its node does not answer")
    error = DmpError(exc.details() or code.name)
    error.code = code
    error.reason = reason or code.name
    return error


def unreachable(region: str, why: str) -> Unavailable:
    return Unavailable(
        f"region {region} ({region_name(region)}) cannot be reached now: {why}; retry later"
    )


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


def forward_assertion(assertion: VerifiedAssertion, request_id: str) -> Metadata:
    """What the directory passes to a node for an act whose assertion names no patient (a
    pharmacist who scanned a prescription id): the caller's assertion and the request id;
    no directives, since the directory does not know whose they are: the node takes the
    patient from what it holds and reads their directives itself."""
    return ((ASSERTION_KEY, assertion.raw), (REQUEST_ID_KEY, request_id))


def routed_address(discovery: Discovery, region: str) -> str:
    """The address of the node serving `region`; UNAVAILABLE naming the region when no node
    is registered for it or it is not reachable now."""
    route = discovery.routes().get(region)
    if route is None:
        raise unreachable(region, "no node is registered for it")
    if not route.healthy:
        raise unreachable(region, route.reason or "its node is not healthy")
    return route.address


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
