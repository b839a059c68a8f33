"""Domain errors and the one place that maps them to gRPC status codes.

Domain code raises these; servicers never pick status codes themselves. The message of a
domain error is public: it must say what was wrong and what to do, and never carry record
content or keys.
"""

from __future__ import annotations

import grpc


class DmpError(Exception):
    """Base of every error whose message may be shown to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    #: For a failure that is not a domain error (dmp/failures.py): where the service's log
    #: holds its cause.
    ref: str = ""
    #: Sent with the reason (ErrorInfo.metadata): e.g. where the region moved to.
    metadata: dict[str, str]
    #: Seconds after which a retry may succeed (sent as google.rpc.RetryInfo).
    retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidArgument(DmpError):
    """The request is malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(DmpError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(DmpError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class PermissionDenied(DmpError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unauthenticated(DmpError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class FailedPrecondition(DmpError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(DmpError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Unavailable(DmpError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DataLoss(DmpError):
    code = grpc.StatusCode.DATA_LOSS
    reason = "DATA_LOSS"
