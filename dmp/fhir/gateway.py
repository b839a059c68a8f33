"""The FHIR gateway's HTTP side: each FHIR request, checked, as calls of the federation.

A Starlette app; the federation's calls are blocking gRPC calls run on the thread pool.
Every answer is FHIR JSON, every refusal an OperationOutcome with the HTTP status
``dmp.fhir.errors`` gives it.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dmp.errors import DmpError
from dmp.fhir import params
from dmp.fhir.audit import audit_event_resource
from dmp.fhir.bundles import query_url, regions_outcome, searchset
from dmp.fhir.capability import capability_statement
from dmp.fhir.errors import FhirError, bad_parameter, from_domain, from_rpc
from dmp.fhir.everything import entry_url, natural_entries
from dmp.fhir.federation import Federation
from dmp.fhir.mapping import Resource, binary_id, document_reference, patient
from dmp.fhir.medication import dispensable_requests
from dmp.fhir.transaction import load, response_bundle
from dmp.v1 import record_pb2

log = logging.getLogger("dmp.fhir")

FHIR_JSON = "application/fhir+json"
_DOCUMENT_PARAMS = (
    "patient.identifier", "patient", "subject.identifier", "subject", "type", "category",
    "date", "period", "status", "_count", "_page_token",
)  # fmt: skip

#: What a POST body may be: never a type a web page may POST across sites without a CORS
#: preflight (text/plain, form data), so that a page open in the professional's browser
#: cannot make the loopback gateway write as the professional.
_BODY_TYPES = frozenset({FHIR_JSON, "application/json"})


class FhirResponse(Response):
    media_type = FHIR_JSON

    def __init__(self, content: Resource, status_code: int = 200) -> None:
        super().__init__(content, status_code=status_code)

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _content_url(base: str, record: record_pb2.Record) -> str:
    return f"{base}/Binary/{binary_id(record)}"


class Gateway:
    """The routes, over one :class:`Federation`."""

    def __init__(self, federation: Federation, *, max_body: int) -> None:
        self.federation = federation
        self.max_body = max_body

    async def metadata(self, request: Request) -> Response:
        params.check_known(request.query_params, ())
        identity = self.federation.principal.identity
        writes = self.federation.node is not None
        return FhirResponse(capability_statement(_base(request), identity, writes=writes))

    async def search_patient(self, request: Request) -> Response:
        query = request.query_params
        params.check_known(query, ("identifier", "_id"))
        ins = params.patient_ins(query, "identifier", "_id")
        assert ins is not None
        found = await run_in_threadpool(self.federation.patient, ins)
        base = _base(request)
        matches = [(f"Patient/{ins}", patient(found))] if found is not None else []
        self_url = query_url(base, "Patient", dict(query))
        return FhirResponse(searchset(base, matches, self_url=self_url, total=len(matches)))

    async def read_patient(self, request: Request) -> Response:
        params.check_known(request.query_params, ())
        ins = params.ins_value("id", request.path_params["ins"])
        found = await run_in_threadpool(self.federation.patient, ins)
        if found is None:
            raise FhirError(404, "not-found", f"Patient/{ins} is not known to the directory")
        return FhirResponse(patient(found))

    async def _view_bundle(
        self,
        request: Request,
        path: str,
        ins: str,
        *,
        natural: bool,
        kinds: list[record_pb2.RecordKind.ValueType],
        type_codes: list[str],
        dates: params.DateRange,
        statuses: params.Statuses,
    ) -> Response:
        """One page of the consolidated view as a searchset, its next link carrying the
        view's own (opaque) page token."""
        query = request.query_params
        count = params.count(query)
        token = params.page_token(query)
        page = await run_in_threadpool(
            self.federation.view_page,
            ins,
            kinds=kinds,
            type_codes=type_codes,
            dates=dates,
            include_superseded=statuses.include_superseded,
            count=count,
            token=token,
        )
        base = _base(request)
        wanted = {record_pb2.RECORD_STATUS_CURRENT} if "current" in statuses.wanted else set()
        if "superseded" in statuses.wanted:
            wanted.add(record_pb2.RECORD_STATUS_SUPERSEDED)
        records = [r for r in page.records if r.status in wanted]
        if natural:
            matches = await run_in_threadpool(self._natural, base, records)
        else:
            matches = []
            for record in records:
                resource = document_reference(record, _content_url(base, record))
                matches.append((entry_url(resource), resource))
        include = []
        if natural and not token:
            try:
                identity = await run_in_threadpool(self.federation.patient, ins)
            except FhirError as exc:  # the records were allowed; the identity alone not
                if exc.status not in (403, 404):
                    raise
                identity = None
            if identity is not None:
                include.append((f"Patient/{ins}", patient(identity)))
        next_url = None
        if page.next_page_token:
            next_url = query_url(
                base,
                path,
                {**_multi(query, skip="_page_token"), "_page_token": page.next_page_token},
            )
        bundle = searchset(
            base,
            matches,
            include=include,
            self_url=query_url(base, path, _multi(query)),
            next_url=next_url,
            outcome=regions_outcome(page.regions),
        )
        return FhirResponse(bundle)

    def _natural(self, base: str, records: list[record_pb2.Record]) -> list[tuple[str, Resource]]:
        return natural_entries(
            records, lambda r: _content_url(base, r), self.federation.read_content
        )

    async def search_medication_requests(self, request: Request) -> Response:
        """Dispensable prescriptions of every region: MedicationRequests, status active."""
        query = request.query_params
        params.check_known(query, ("patient.identifier", "patient", "subject", "status"))
        ins = params.patient_ins(query, "patient.identifier", "patient", "subject")
        assert ins is not None
        wanted = {t for v in query.getlist("status") for t in v.split(",")} or {"active"}
        if wanted != {"active"}:
            raise bad_parameter(
                "status", "only status=active (the dispensable prescriptions) is supported"
            )
        base = _base(request)
        matches, outcome = await run_in_threadpool(self._active, base, ins)
        bundle = searchset(
            base,
            matches,
            self_url=query_url(base, "MedicationRequest", _multi(query)),
            outcome=outcome,
            total=len(matches),
        )
        return FhirResponse(bundle)

    def _active(self, base: str, ins: str) -> tuple[list[tuple[str, Resource]], Resource | None]:
        found = self.federation.dispensable(ins)
        matches = [
            (entry_url(r), r)
            for stored in found.prescriptions
            for r in dispensable_requests(stored)
        ]
        return matches, regions_outcome(found.regions.values())

    async def search_documents(self, request: Request) -> Response:
        query = request.query_params
        params.check_known(query, _DOCUMENT_PARAMS)
        ins = params.patient_ins(
            query, "patient.identifier", "patient", "subject.identifier", "subject"
        )
        assert ins is not None
        return await self._view_bundle(
            request,
            "DocumentReference",
            ins,
            natural=False,
            kinds=params.kinds(query),
            type_codes=params.type_codes(query),
            dates=params.date_range(query, "date", "period"),
            statuses=params.statuses(query),
        )

    async def everything(self, request: Request) -> Response:
        query = request.query_params
        params.check_known(query, ("_count", "_page_token"))
        ins = params.ins_value("id", request.path_params["ins"])
        return await self._view_bundle(
            request,
            f"Patient/{ins}/$everything",
            ins,
            natural=True,
            kinds=[],
            type_codes=[],
            dates=params.DateRange(),
            statuses=params.Statuses(),
        )

    async def binary(self, request: Request) -> Response:
        params.check_known(request.query_params, ())
        key = request.path_params["id"]
        location = await run_in_threadpool(self.federation.locate, key)
        content = await run_in_threadpool(self.federation.content, location)
        record = content.record
        headers = {"Content-Length": str(record.size)} if record.size else {}
        if record.sha256:  # RFC 9530, and in hex as the DocumentReference gives it
            digest = base64.b64encode(bytes.fromhex(record.sha256)).decode()
            headers["Repr-Digest"] = f"sha-256=:{digest}:"
            headers["X-Content-SHA256"] = record.sha256
        return StreamingResponse(
            iterate_in_threadpool(content.chunks),
            media_type=record.content_type or "application/octet-stream",
            headers=headers,
        )

    async def transaction(self, request: Request) -> Response:
        """IHE ITI-65: a transaction Bundle stored at the node, all or nothing."""
        params.check_known(request.query_params, ())
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media not in _BODY_TYPES:  # text/plain is what a cross-site page may POST
            raise FhirError(
                415,
                "not-supported",
                f"Content-Type {media or '(none)'!r}: a transaction Bundle is sent as"
                " application/fhir+json (or application/json)",
            )
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > self.max_body:
                raise FhirError(
                    413,
                    "too-costly",
                    f"the request body is over the gateway's limit of {self.max_body} bytes",
                )
        bundle = load(bytes(body))
        stored = await run_in_threadpool(self.federation.write, bundle, max_content=self.max_body)
        return FhirResponse(response_bundle(stored, _base(request)))

    async def search_audit(self, request: Request) -> Response:
        query = request.query_params
        params.check_known(query, ("patient.identifier", "patient", "_count"))
        ins = params.patient_ins(query, "patient.identifier", "patient")
        assert ins is not None
        limit = params.count(query)
        answer = await run_in_threadpool(self.federation.access_history, ins, limit)
        base = _base(request)
        matches = []
        for event in answer.events:
            resource = audit_event_resource(event)
            matches.append((f"AuditEvent/{resource['id']}", resource))
        bundle = searchset(
            base,
            matches,
            self_url=query_url(base, "AuditEvent", _multi(query)),
            outcome=regions_outcome(answer.regions),
        )
        return FhirResponse(bundle)


def _multi(query: Any, *, skip: str = "") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in query.multi_items():
        if key != skip:
            out.setdefault(key, []).append(value)
    return out


def _error_response(exc: Exception) -> Response:
    if isinstance(exc, FhirError):
        error = exc
    elif isinstance(exc, grpc.RpcError):
        error = from_rpc(exc)
    elif isinstance(exc, DmpError):
        error = from_domain(exc)
    elif isinstance(exc, HTTPException):
        issue = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        text = {
            404: "no such FHIR endpoint here: see /metadata for what this gateway supports",
            405: "this method is not supported here: GET, and POST / for transactions"
            " (see /metadata)",
        }.get(exc.status_code, str(exc.detail))
        error = FhirError(exc.status_code, issue, text)
    else:
        log.exception("FHIR gateway: unexpected failure")
        error = FhirError(500, "exception", "internal error of the gateway: see its log")
    return FhirResponse(error.outcome(), status_code=error.status)


async def _on_error(_request: Request, exc: Exception) -> Response:
    return _error_response(exc)


class BodyLimit:
    """413 for a request whose body is over the limit, before reading any of it."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                    error = FhirError(
                        413,
                        "too-costly",
                        f"the request body ({int(value)} bytes) is over the gateway's limit"
                        f" of {self.max_body} bytes",
                    )
                    response = FhirResponse(error.outcome(), status_code=413)
                    response.headers["Connection"] = "close"
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def loopback_host(host: str) -> bool:
    """Whether a Host header (or a --listen host) names this machine's loopback."""
    name = host.strip()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _other_site(headers: Any) -> bool:
    """Whether a browser says the request comes from a page of another site (software and
    curl send neither header)."""
    for name, value in headers:
        if name == b"sec-fetch-site" and value not in (b"none", b"same-origin"):
            return True
        if name == b"origin":
            origin = value.decode("latin-1")
            host = origin.partition("://")[2]
            if not (origin.startswith(("http://", "https://")) and loopback_host(host)):
                return True
    return False


class LoopbackHost:
    """421 for a request whose Host is not a loopback name: a plain-HTTP gateway on loopback
    acts as its identity for whoever reaches it, and a web page that rebinds its own DNS
    name to 127.0.0.1 would otherwise read the answers as its own origin. 403 for what a
    browser sends on behalf of a page of another site: its blind GETs would still make the
    gateway look patients up in the professional's name."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _other_site(scope.get("headers", ())):
            error = FhirError(
                403,
                "forbidden",
                "a browser sent this request for a page of another site: this gateway"
                " answers the professional's own software only",
            )
            await FhirResponse(error.outcome(), status_code=403)(scope, receive, send)
            return
        if scope["type"] == "http":
            hosts = [v for k, v in scope.get("headers", ()) if k == b"host"]
            if hosts and not all(loopback_host(v.decode("latin-1")) for v in hosts):
                error = FhirError(
                    421,
                    "forbidden",
                    "this gateway serves loopback only: the request's Host header must be"
                    " localhost or a loopback address (a page of another site is refused)",
                )
                await FhirResponse(error.outcome(), status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_name(path: str) -> str:
    """What a log line may say of a path: the resource and interaction, never an id (a
    Patient id is an INS)."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "/"
    name = "/" + parts[0]
    if len(parts) > 1:
        name += "/*"
    if len(parts) > 2:
        name += "/" + parts[-1] if parts[-1].startswith("$") else "/*"
    return name


class RequestLog:
    """One JSON line per request: method, resource, status, duration; no query string,
    no ids, no content (they name patients)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            line = {
                "method": scope.get("method", ""),
                "resource": _route_name(scope.get("path", "")),
                "status": status[0],
                "ms": round((time.monotonic() - started) * 1000, 1),
            }
            log.info("%s", json.dumps(line))


def build_app(federation: Federation, *, max_body: int, loopback: bool = False) -> ASGIApp:
    """The gateway's ASGI app; ``loopback`` (plain HTTP) refuses a Host that is not."""
    gateway = Gateway(federation, max_body=max_body)
    get = ["GET"]
    routes = [
        Route("/", gateway.transaction, methods=["POST"]),
        Route("/metadata", gateway.metadata, methods=get),
        Route("/Patient", gateway.search_patient, methods=get),
        Route("/Patient/{ins}", gateway.read_patient, methods=get),
        Route("/Patient/{ins}/$everything", gateway.everything, methods=get),
        Route("/DocumentReference", gateway.search_documents, methods=get),
        Route("/MedicationRequest", gateway.search_medication_requests, methods=get),
        Route("/Binary/{id}", gateway.binary, methods=get),
        Route("/AuditEvent", gateway.search_audit, methods=get),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        Exception: _on_error,
        HTTPException: _on_error,
        FhirError: _on_error,
        DmpError: _on_error,
        grpc.RpcError: _on_error,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    limited = BodyLimit(app, max_body)
    return RequestLog(LoopbackHost(limited) if loopback else limited)


__all__ = ["build_app"]
