"""Errors as FHIR: what the federation answered, as an HTTP status and an OperationOutcome.

Every refusal and every bad request the gateway answers goes through here, so that one
table decides which HTTP status a gRPC status becomes (FHIR R4 "RESTful API", HTTP status
codes; OperationOutcome issue types from the IssueType value set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import grpc

from dmp.errors import DmpError
from dmp.regions import region_name


@dataclass(frozen=True)
class HttpStatus:
    """The HTTP status a gRPC status becomes, and the OperationOutcome issue's type."""

    status: int
    issue: str


#: The one map from gRPC status codes to HTTP. Refusals say only what the federation said:
#: a caller who may not see a patient is refused whether or not the patient exists.
GRPC_TO_HTTP: Final[dict[grpc.StatusCode, HttpStatus]] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpStatus(400, "invalid"),
    grpc.StatusCode.OUT_OF_RANGE: HttpStatus(400, "invalid"),
    grpc.StatusCode.UNAUTHENTICATED: HttpStatus(401, "login"),
    grpc.StatusCode.PERMISSION_DENIED: HttpStatus(403, "forbidden"),
    grpc.StatusCode.NOT_FOUND: HttpStatus(404, "not-found"),
    grpc.StatusCode.ALREADY_EXISTS: HttpStatus(409, "duplicate"),
    grpc.StatusCode.ABORTED: HttpStatus(409, "conflict"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpStatus(409, "business-rule"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpStatus(429, "throttled"),
    grpc.StatusCode.CANCELLED: HttpStatus(499, "timeout"),
    grpc.StatusCode.UNAVAILABLE: HttpStatus(503, "transient"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpStatus(504, "timeout"),
    grpc.StatusCode.DATA_LOSS: HttpStatus(500, "exception"),
    grpc.StatusCode.UNIMPLEMENTED: HttpStatus(501, "not-supported"),
    grpc.StatusCode.INTERNAL: HttpStatus(500, "exception"),
    grpc.StatusCode.UNKNOWN: HttpStatus(502, "exception"),
}
_DEFAULT: Final = HttpStatus(500, "exception")


class FhirError(Exception):
    """A request the gateway answers with an OperationOutcome and an HTTP status.

    ``expression`` names what was wrong (a search parameter, a path element)."""

    def __init__(
        self, status: int, issue: str, diagnostics: str, *, expression: str | None = None
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.issue = issue
        self.diagnostics = diagnostics
        self.expression = expression

    def outcome(self) -> dict[str, Any]:
        return operation_outcome([issue(self.issue, self.diagnostics, expression=self.expression)])


def bad_parameter(name: str, message: str) -> FhirError:
    """400 naming the search parameter (or path element) that is wrong."""
    return FhirError(400, "invalid", f"{name}: {message}", expression=name)


def issue(
    code: str,
    diagnostics: str,
    *,
    severity: str = "error",
    expression: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One OperationOutcome issue."""
    out: dict[str, Any] = {"severity": severity, "code": code}
    if details:
        out["details"] = details
    out["diagnostics"] = diagnostics
    if expression:
        out["expression"] = [expression]
    return out


def operation_outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": issues}


def _details(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return code, details or code.name


def from_rpc(exc: grpc.RpcError, *, region: str | None = None) -> FhirError:
    """The federation's answer to one call, as FHIR. With ``region`` (the call was relayed
    to that region's node), a region that cannot be reached is a 503 naming it."""
    code, details = _details(exc)
    mapped = GRPC_TO_HTTP.get(code, _DEFAULT)
    unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or (
        code == grpc.StatusCode.FAILED_PRECONDITION and "not reachable" in details
    )
    if region is not None and unreachable:
        name = region_name(region)
        return FhirError(
            503,
            "transient",
            f"region {region} ({name}) is unavailable: {details}"
            + ("" if "retry later" in details else "; retry later"),
        )
    if code == grpc.StatusCode.UNAVAILABLE and region is None:
        details = f"the federation cannot be reached: {details}; retry later"
    return FhirError(mapped.status, mapped.issue, f"{code.name}: {details}")


def from_domain(exc: DmpError) -> FhirError:
    """A check of ours (an INS with a wrong key...) refused before any call."""
    mapped = GRPC_TO_HTTP.get(exc.code, _DEFAULT)
    return FhirError(mapped.status, mapped.issue, exc.message)
