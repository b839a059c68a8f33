"""What every federation server shares: mutual TLS, the caller's identity from its
certificate and the CRL (one interceptor), streams within limits (dmp/streams.py), domain
errors mapped to status codes in one place and every other failure through
dmp/failures.py, refusals made here audited (dmp/audit/refusals.py), one structured log line per
call with its real status, health and reflection, graceful SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dmp.audit.refusals import RefusalTrail, refusal_event
from dmp.errors import DmpError, Unauthenticated
from dmp.failures import public_failure
from dmp.identity import Principal
from dmp.pki import Credentials, RevocationList, certificate_from_pem, principal_from_pem
from dmp.streams import StreamGate, StreamLimits
from dmp.tls import DEFAULT_MAX_CONTENT, server_credentials, server_options

log = logging.getLogger("dmp.rpc")

STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN = "dmp.federation"


class CallContext:
    """The servicer context of one call, with the caller's verified principal.

    Everything else is delegated to grpc's own context.
    """

    __slots__ = ("_context", "principal")

    def __init__(self, context: grpc.ServicerContext, principal: Principal) -> None:
        self._context = context
        self.principal = principal

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        return self._context.invocation_metadata()  # type: ignore[no-any-return]

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()  # type: ignore[no-any-return]


def abort_with(context: grpc.ServicerContext, error: DmpError) -> None:
    """Abort the call with the error's status, its message, an ErrorInfo reason (with the
    error's metadata) and, for an error worth retrying, a RetryInfo delay."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=getattr(error, "metadata", {})
    )
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(info)
    if error.retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(int(error.retry_after * 1000))
        status.details.add().Pack(retry)
    context.set_trailing_metadata(((STATUS_DETAILS_KEY, status.SerializeToString()),))
    context.abort(error.code, error.message)


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


def error_reason(error: grpc.RpcError) -> str | None:
    """The ErrorInfo reason a federation server attached to an error, if any."""
    info = _error_info(error)
    return None if info is None else str(info.reason)


def error_metadata(error: grpc.RpcError) -> dict[str, str]:
    """The ErrorInfo metadata a federation server attached to an error (e.g. `successor`,
    where a region moved to)."""
    info = _error_info(error)
    return {} if info is None else dict(info.metadata)


class ServiceGate:
    """Closes a server to every call but health, reflection and the `open_to` services,
    with the error the callers get (the hand-over's REGION_MOVING, then REGION_MOVED);
    counts the calls it let in, so that closing can wait for them to finish."""

    _ALWAYS = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, open_to: Sequence[str] = ()) -> None:
        self._open_to = tuple(f"/{name}/" for name in open_to) + self._ALWAYS
        self._closed: DmpError | None = None
        self._in_flight = 0
        self._calls: set[grpc.ServicerContext] = set()
        self._idle = threading.Condition()

    @property
    def closed(self) -> DmpError | None:
        return self._closed

    @property
    def in_flight(self) -> int:
        """How many calls it let in are running."""
        return self._in_flight

    def close(self, error: DmpError) -> None:
        with self._idle:
            self._closed = error

    def open(self) -> None:
        with self._idle:
            self._closed = None

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no call let in before the gate closed is running; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def cancel_in_flight(self) -> int:
        """Cancel the calls still running (streams left open across a freeze): their
        peers see CANCELLED and retry; what they committed stays. How many were."""
        with self._idle:
            calls = list(self._calls)
        for context in calls:
            context.cancel()
        return len(calls)

    def exempt(self, method: str) -> bool:
        return method.startswith(self._open_to)

    @contextlib.contextmanager
    def admit(self, method: str, context: grpc.ServicerContext | None = None) -> Iterator[None]:
        if self.exempt(method):
            yield
            return
        with self._idle:
            closed = self._closed
            if closed is not None:  # a fresh one: calls are refused in parallel
                raise type(closed)(
                    closed.message,
                    reason=closed.reason,
                    metadata=closed.metadata,
                    retry_after=closed.retry_after,
                )
            self._in_flight += 1
            if context is not None:
                self._calls.add(context)
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                self._calls.discard(context)
                if self._in_flight == 0:
                    self._idle.notify_all()


class RevokedCertificate(Unauthenticated):
    """The peer's certificate is on the federation CA's revocation list."""

    def __init__(self, principal: Principal) -> None:
        super().__init__(
            "this certificate has been revoked by the federation CA: ask for a new one"
        )
        self.principal = principal


class Authenticator:
    """Who is calling: the principal in the peer certificate, refused when revoked."""

    def __init__(self, revocation: RevocationList) -> None:
        self._revocation = revocation

    def __call__(self, context: grpc.ServicerContext) -> Principal:
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise Unauthenticated("a federation client certificate is required")
        pem: bytes = pems[0]
        try:
            # Both are cached by PEM: a connection presents the same one for every call.
            revoked = self._revocation.is_revoked(certificate_from_pem(pem))
            principal = principal_from_pem(pem)
        except DmpError as exc:
            raise Unauthenticated(exc.message) from None
        if revoked:
            raise RevokedCertificate(principal)
        return principal


class CallInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call, keeps streams within limits, turns away a person whose
    calls are refused in a flood, maps every error to its status (domain errors as they
    say, anything else through dmp/failures.py), logs one line a call with its real code.
    Refusals made here (no valid certificate, a flood) are audited with ``refusals``."""

    def __init__(
        self,
        authenticate: Authenticator,
        streams: StreamGate | None = None,
        refusals: RefusalTrail | None = None,
        unary_workers: int = 32,
        gate: ServiceGate | None = None,
    ) -> None:
        self._gate = gate or ServiceGate()
        self._authenticate = authenticate
        self._streams = streams or StreamGate()
        self._refusals = refusals
        # Unary calls run as many at once as before the pool grew for streams (the
        # database pools are sized for that); the rest wait for their turn.
        self._unary = threading.BoundedSemaphore(unary_workers)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        # Every call is served as request-streaming: grpcio reads a unary request before
        # any of our code runs, in a worker thread, for as long as the peer holds it back;
        # read as a stream's first message, its wait is admitted and timed here.
        if handler.unary_unary:
            return handler._replace(
                request_streaming=True,
                unary_unary=None,
                stream_unary=self._wrap(handler.unary_unary, method, one_request=True),
            )
        if handler.unary_stream:
            return handler._replace(
                request_streaming=True,
                unary_stream=None,
                stream_stream=self._wrap_stream(handler.unary_stream, method, False),
            )
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap(handler.stream_unary, method))
        return handler._replace(
            stream_stream=self._wrap_stream(handler.stream_stream, method, True)
        )

    def _caller(self, context: grpc.ServicerContext, method: str) -> Principal:
        """The authenticated caller, unless refused here (and audited)."""
        try:
            principal = self._authenticate(context)
        except Unauthenticated as exc:
            self._audit_refusal(getattr(exc, "principal", None), method, exc)
            raise
        if self._refusals is not None:
            flood = self._refusals.flooding(principal)
            if flood is not None:
                self._audit_refusal(principal, method, flood)
                raise flood
        return principal

    def _audit_refusal(self, who: Principal | None, method: str, error: DmpError) -> None:
        if self._gate.closed is not None:  # handed over: this log takes no more events
            log.warning("refused %s to %s: %s", method, who.uri if who else "-", error.message)
            return
        if self._refusals is not None:
            event = refusal_event(who, method, error.code.name, error.message)
            self._refusals.record(who, event)

    def _fail(
        self,
        context: grpc.ServicerContext,
        method: str,
        exc: Exception,
        who: Principal | None,
    ) -> None:
        """Abort the call for `exc` (its status is then what the call's log line says)."""
        if isinstance(exc, DmpError):
            error = exc
        else:
            code = context.code() if hasattr(context, "code") else None
            if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
                raise exc  # a handler aborted the call itself: its status stands
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                raise exc  # the peer went away
            error = public_failure(exc, method)
            if self._gate.closed is not None:  # handed over: its log takes no more events
                log.warning("%s failed after the gate closed: %s", method, error.message)
            elif self._refusals is not None:  # a failure no audited call recorded
                event = refusal_event(who, method, error.code.name, error.message)
                # If it cannot be written the audit log said why; the caller gets the failure.
                with contextlib.suppress(DmpError):
                    self._refusals.record(who, event)
        abort_with(context, error)

    def _wrap(
        self, behavior: Callable[[Any, Any], Any], method: str, one_request: bool = False
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            caller = "-"
            principal: Principal | None = None
            try:
                with self._gate.admit(method, context):
                    principal = self._caller(context, method)
                    caller = principal.uri
                    return self._unary_call(
                        behavior, requests, context, method, principal, one_request=one_request
                    )
            except Exception as exc:
                self._fail(context, method, exc, principal)
            finally:
                _log_call(method, caller, context, start)

        return unary

    def _unary_call(
        self,
        behavior: Callable[[Any, Any], Any],
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        method: str,
        principal: Principal,
        *,
        one_request: bool = False,
    ) -> Any:
        call = CallContext(context, principal)
        if one_request:
            with self._streams.admit(principal, context, method, pending=True) as wait:
                request = wait.first(requests)
            with self._unary:
                return behavior(request, call)
        with self._streams.admit(principal, context, method) as stream:
            return behavior(stream.requests(requests), call)

    def _wrap_stream(
        self, behavior: Callable[[Any, Any], Iterator[Any]], method: str, requests: bool
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def streaming(requests_: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            caller = "-"
            principal: Principal | None = None
            try:
                with self._gate.admit(method, context):
                    principal = self._caller(context, method)
                    caller = principal.uri
                    with self._streams.admit(principal, context, method) as stream:
                        argument = (
                            stream.requests(requests_) if requests else stream.first(requests_)
                        )
                        yield from stream.responses(
                            iter(behavior(argument, CallContext(context, principal)))
                        )
            except Exception as exc:
                self._fail(context, method, exc, principal)
            finally:
                _log_call(method, caller, context, start)

        return streaming


_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _log_call(method: str, caller: str, context: grpc.ServicerContext, start: float) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        status = code.name
    elif hasattr(context, "is_active") and not context.is_active():
        status = "CANCELLED"  # ended by the peer (or its deadline) before we answered
    else:
        status = "OK"
    # The JSON object json.dumps would write, without its encoder's machinery per call.
    log.info(
        '{"method": %s, "caller": %s, "code": %s, "ms": %r}',
        _json_string(method),
        _json_string(caller),
        _json_string(status),
        round((time.perf_counter() - start) * 1000, 2),
    )


@dataclass
class ServiceSpec:
    """One gRPC service to expose: its full name and how to add it to a server."""

    name: str
    add: Callable[[grpc.Server], None]


@dataclass
class FederationServer:
    """A started server; `port` is the bound port (useful with port 0)."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    #: Closes the server to all calls but health and reflection (a hand-over's freeze).
    gate: ServiceGate = field(default_factory=ServiceGate)
    #: Run before draining (withdraw from discovery), then after the server stopped.
    before_stop: list[Callable[[], None]] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def stop(self, grace: float | None = 10.0) -> None:
        for hook in self.before_stop:
            hook()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for hook in self.on_stop:
            hook()


def start_server(
    *,
    credentials: Credentials,
    revocation: RevocationList,
    listen: str,
    services: Iterable[ServiceSpec],
    max_content: int = DEFAULT_MAX_CONTENT,
    max_workers: int = 32,
    stream_limits: StreamLimits | None = None,
    refusals: RefusalTrail | None = None,
    gate: ServiceGate | None = None,
) -> FederationServer:
    """Build, bind and start a mutual-TLS server with health and reflection.

    ``max_workers`` threads serve unary calls; the pool has one more for each stream the
    limits admit, so that streams never take a unary call's thread."""
    limits = stream_limits or StreamLimits()
    streams = StreamGate(limits)
    service_gate = gate or ServiceGate()
    threads = max_workers + limits.total
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
        interceptors=[
            CallInterceptor(Authenticator(revocation), streams, refusals, max_workers, service_gate)
        ],
        options=server_options(max_content),
        maximum_concurrent_rpcs=threads * 8,
    )
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for spec in services:
        spec.add(server)
        names.append(spec.name)
        health_servicer.set(spec.name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names, server)
    try:
        port = server.add_secure_port(listen, server_credentials(credentials))
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or not available")
    server.start()
    running = FederationServer(server=server, port=port, health=health_servicer, gate=service_gate)
    running.on_stop.append(streams.close)
    return running


def run_until_signalled(running: FederationServer, grace: float = 10.0) -> int:
    """Block until SIGTERM or SIGINT, then drain in-flight calls and return 0."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stop.wait(3600):
        pass
    logging.getLogger("dmp.server").info("stopping: draining in-flight calls")
    running.stop(grace)
    return 0


def host_port(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"
