"""A small in-process Consul agent for tests: the HTTP endpoints dmp's discovery calls.

Request and response shapes follow Consul's HTTP API (agent and health endpoints):

- PUT  /v1/agent/service/register          (JSON body; keys case-insensitive, snake_case too;
                                             `Check` or `Checks`; only TTL checks)
- PUT  /v1/agent/service/deregister/<id>
- PUT  /v1/agent/check/pass|warn|fail/<check_id>
- GET  /v1/agent/services                   (map id -> service)
- GET  /v1/agent/service/<id>
- GET  /v1/agent/checks                     (map check id -> check)
- GET  /v1/health/service/<name>            (`passing`, blocking `index` + `wait`,
                                             X-Consul-Index header)
- GET  /v1/status/leader

Semantics kept from Consul: a check starts "critical" unless its definition gives a
Status; a TTL check not passed within its TTL turns "critical" (evaluated on every read and
by a ticker, so blocking queries wake up); a service whose check stays critical longer than
DeregisterCriticalServiceAfter is removed; every state change bumps one global index; a
blocking query waits while the index is not above the one asked for, up to `wait`.

Simplifications: one node, one datacenter; re-registering a service resets its checks to
their initial status; reads ignore ACLs. With `required_token` set, writes without that
token (X-Consul-Token header or `token` parameter) are answered 200 and ignored, as a
registration made with a token that lacks rights may look to py-consul.

stop() makes the agent stop answering (listening socket closed, held blocking queries
dropped without answer); start() brings it back on the same port with the same state.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_STATUSES = ("passing", "warning", "critical")
TICK_SECONDS = 0.05
DEFAULT_WAIT_SECONDS = 300.0
MAX_WAIT_SECONDS = 600.0


def parse_duration(text: str) -> float:
    """Seconds of a Go duration ("1s", "500ms", "1m30s"); ValueError if it is not one."""
    if not text or _DURATION.sub("", text) != "":
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))


def _norm(data: dict[str, Any]) -> dict[str, Any]:
    """Consul decodes these bodies case-insensitively and accepts snake_case aliases."""
    return {key.lower().replace("_", ""): value for key, value in data.items()}


@dataclass
class FakeService:
    id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]

    def as_agent_service(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
            "Port": self.port,
            "Address": self.address,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Datacenter": "dc1",
        }


@dataclass
class FakeCheck:
    check_id: str
    name: str
    service_id: str
    service_name: str
    ttl: float | None
    status: str
    notes: str = ""
    output: str = ""
    deregister_after: float | None = None
    #: monotonic time at which the TTL runs out (None: not a TTL check).
    deadline: float | None = None
    #: monotonic time since when the check is critical (None: not critical).
    critical_since: float | None = field(default=None)

    def as_health_check(self, node: str) -> dict[str, Any]:
        return {
            "Node": node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": [],
            "Type": "ttl" if self.ttl is not None else "",
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeConsul


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, so a stopped agent answers nothing any more.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self.server.fake._handle(self, "GET")

    def do_PUT(self) -> None:
        self.server.fake._handle(self, "PUT")

    def answer(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, str):
            data = body.encode()
            content_type = "text/plain; charset=utf-8"
        else:
            value = body.value if isinstance(body, _Json) else body
            data = json.dumps(value).encode()
            content_type = "application/json"
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@dataclass(frozen=True)
class _Json:
    """A JSON body that is a string (a bare str body is sent as text)."""

    value: Any


class _Dropped(Exception):
    """The agent stopped while a request was held: close the connection without answer."""


class FakeConsul:
    """A fake Consul agent on 127.0.0.1 (port 0 by default). Use as a context manager."""

    def __init__(
        self,
        *,
        required_token: str | None = None,
        node_name: str = "fake-consul-node",
        node_address: str = "127.0.0.1",
    ) -> None:
        self.required_token = required_token
        self.node_name = node_name
        self.node_address = node_address
        self._node_id = str(uuid.uuid4())
        self._cond = threading.Condition()
        self._services: dict[str, FakeService] = {}
        self._checks: dict[str, FakeCheck] = {}
        self._index = 1
        self._port = 0
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()
        #: (method, path with query, token) of every request, for tests.
        self.requests: list[tuple[str, str, str | None]] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeConsul:
        """Listen (again, on the same port after stop()) and answer."""
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", self._port), _Handler)
        server.fake = self
        self._port = server.server_address[1]
        with self._cond:
            self._server = server
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._serve_thread.start()
        if self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="fake-consul-tick", daemon=True)
            self._ticker.start()
        return self

    def stop(self) -> None:
        """Stop answering: the port refuses connections, held blocking queries are dropped."""
        with self._cond:
            server, self._server = self._server, None
            self._cond.notify_all()
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)

    def __enter__(self) -> FakeConsul:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # -- state for tests -----------------------------------------------------------------------

    @property
    def index(self) -> int:
        with self._cond:
            return self._index

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        """What GET /v1/agent/services would answer."""
        with self._cond:
            self._evaluate(time.monotonic())
            return {sid: s.as_agent_service() for sid, s in self._services.items()}

    @property
    def checks(self) -> dict[str, dict[str, Any]]:
        """What GET /v1/agent/checks would answer."""
        with self._cond:
            self._evaluate(time.monotonic())
            return {cid: c.as_health_check(self.node_name) for cid, c in self._checks.items()}

    def set_check_status(self, check_id: str, status: str) -> None:
        """Set a check's status as Consul would on /v1/agent/check/<pass|warn|fail>."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}")
        with self._cond:
            self._set_status(self._checks[check_id], status, "set by the test", time.monotonic())

    def set_index(self, index: int) -> None:
        """Move the index (e.g. backwards, as after a snapshot restore) and wake queries."""
        with self._cond:
            self._index = index
            self._cond.notify_all()

    # -- request handling -----------------------------------------------------------------------

    def _handle(self, request: _Handler, method: str) -> None:
        parts = urllib.parse.urlsplit(request.path)
        path = urllib.parse.unquote(parts.path)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        token = request.headers.get("X-Consul-Token") or next(iter(query.get("token", [])), None)
        with self._cond:
            self.requests.append((method, request.path, token))
        try:
            code, body, headers = self._route(method, path, query, token, request)
        except _Dropped:
            request.close_connection = True
            return
        request.answer(code, body, headers)

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        token: str | None,
        request: _Handler,
    ) -> tuple[int, Any, dict[str, str] | None]:
        if method == "PUT":
            length = int(request.headers.get("Content-Length") or 0)
            raw = request.rfile.read(length) if length else b""
            allowed = self.required_token is None or token == self.required_token
            if path == "/v1/agent/service/register":
                return self._register(raw, allowed)
            if path.startswith("/v1/agent/service/deregister/"):
                return self._deregister(path.rsplit("/", 1)[1], allowed)
            match = re.fullmatch(r"/v1/agent/check/(pass|warn|fail)/(.+)", path)
            if match:
                status = {"pass": "passing", "warn": "warning", "fail": "critical"}[match[1]]
                note = (query.get("note") or [""])[0]
                return self._update_ttl(match[2], status, note, allowed)
        elif method == "GET":
            if path == "/v1/agent/services":
                return 200, self.services, None
            if path == "/v1/agent/checks":
                return 200, self.checks, None
            if path.startswith("/v1/agent/service/"):
                service_id = path.removeprefix("/v1/agent/service/")
                found = self.services.get(service_id)
                if found is None:
                    return 404, f"unknown service ID: {service_id}", None
                return 200, found, None
            if path.startswith("/v1/health/service/"):
                return self._health_service(path.removeprefix("/v1/health/service/"), query)
            if path == "/v1/status/leader":
                return 200, _Json("127.0.0.1:8300"), None
        return 404, f"fake Consul: no handler for {method} {path}", None

    def _register(self, raw: bytes, allowed: bool) -> tuple[int, Any, None]:
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return 400, f"Request decode failed: {exc}", None
        data = _norm(body)
        name = data.get("name")
        if not isinstance(name, str) or not name:
            return 400, "Missing service name", None
        service_id = data.get("id") or name
        port = data.get("port") or 0
        if not isinstance(port, int):
            return 400, "Request decode failed: Port must be a number", None
        definitions: list[dict[str, Any]] = []
        if isinstance(data.get("check"), dict) and data["check"]:
            definitions.append(data["check"])
        definitions.extend(c for c in data.get("checks") or [] if isinstance(c, dict))
        now = time.monotonic()
        checks: list[FakeCheck] = []
        for number, definition in enumerate(definitions, start=1):
            spec = _norm(definition)
            if "ttl" not in spec:
                return 400, "fake Consul: only TTL checks are supported", None
            try:
                ttl = parse_duration(str(spec["ttl"]))
                deregister = spec.get("deregistercriticalserviceafter")
                deregister_after = parse_duration(str(deregister)) if deregister else None
            except ValueError as exc:
                return 400, f"Invalid check: {exc}", None
            if deregister_after is not None:
                deregister_after = max(deregister_after, 60.0)  # Consul's minimum
            default_id = (
                f"service:{service_id}"
                if len(definitions) == 1
                else f"service:{service_id}:{number}"
            )
            status = str(spec.get("status") or "critical")
            if status not in _STATUSES:
                return 400, f"Invalid check status {status!r}", None
            checks.append(
                FakeCheck(
                    check_id=str(spec.get("checkid") or spec.get("id") or default_id),
                    name=str(spec.get("name") or f"Service '{name}' check"),
                    service_id=service_id,
                    service_name=name,
                    ttl=ttl,
                    status=status,
                    notes=str(spec.get("notes") or ""),
                    deregister_after=deregister_after,
                    deadline=now + ttl if status != "critical" else None,
                    critical_since=now if status == "critical" else None,
                )
            )
        if not allowed:
            return 200, "", None  # the pitfall: "success", but nothing registered
        with self._cond:
            self._drop_service(service_id)
            self._services[service_id] = FakeService(
                id=service_id,
                name=name,
                address=str(data.get("address") or ""),
                port=port,
                tags=[str(t) for t in data.get("tags") or []],
                meta={str(k): str(v) for k, v in (data.get("meta") or {}).items()},
            )
            for check in checks:
                self._checks[check.check_id] = check
            self._bump()
        return 200, "", None

    def _deregister(self, service_id: str, allowed: bool) -> tuple[int, Any, None]:
        with self._cond:
            if service_id not in self._services:
                return (
                    404,
                    f'Unknown service ID "{service_id}". Ensure that the service ID is passed,'
                    " not the service name.",
                    None,
                )
            if allowed:
                self._drop_service(service_id)
                self._bump()
        return 200, "", None

    def _update_ttl(
        self, check_id: str, status: str, note: str, allowed: bool
    ) -> tuple[int, Any, None]:
        with self._cond:
            now = time.monotonic()
            self._evaluate(now)
            check = self._checks.get(check_id)
            if check is None or check.ttl is None:
                return (
                    404,
                    f'Unknown check ID "{check_id}". Ensure that the check ID is passed,'
                    " not the check name.",
                    None,
                )
            if allowed:
                self._set_status(check, status, note, now)
        return 200, "", None

    def _health_service(
        self, name: str, query: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        passing_values = query.get("passing")
        passing = passing_values is not None and passing_values[0].lower() not in ("false", "0")
        try:
            min_index = int((query.get("index") or ["0"])[0])
            wait_text = (query.get("wait") or [""])[0]
            wait = (
                min(parse_duration(wait_text), MAX_WAIT_SECONDS)
                if wait_text
                else DEFAULT_WAIT_SECONDS
            )
        except ValueError as exc:
            return 400, f"Invalid blocking query parameter: {exc}", {}
        with self._cond:
            deadline = time.monotonic() + wait
            while self._server is not None and min_index > 0 and self._index <= min_index:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._server is None:
                raise _Dropped
            self._evaluate(time.monotonic())
            entries = []
            for service in sorted(self._services.values(), key=lambda s: s.id):
                if service.name != name:
                    continue
                checks = [self._serf_health()] + [
                    c.as_health_check(self.node_name)
                    for c in self._checks.values()
                    if c.service_id == service.id
                ]
                if passing and any(c["Status"] != "passing" for c in checks):
                    continue
                entries.append(
                    {
                        "Node": {
                            "ID": self._node_id,
                            "Node": self.node_name,
                            "Address": self.node_address,
                            "Datacenter": "dc1",
                            "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
                            "Meta": {},
                        },
                        "Service": service.as_agent_service(),
                        "Checks": checks,
                    }
                )
            index = self._index
        return 200, entries, {"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true"}

    # -- state (callers hold self._cond) ---------------------------------------------------------

    def _serf_health(self) -> dict[str, Any]:
        return {
            "Node": self.node_name,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
        }

    def _bump(self) -> None:
        self._index += 1
        self._cond.notify_all()

    def _drop_service(self, service_id: str) -> None:
        self._services.pop(service_id, None)
        for check_id in [c.check_id for c in self._checks.values() if c.service_id == service_id]:
            del self._checks[check_id]

    def _set_status(self, check: FakeCheck, status: str, output: str, now: float) -> None:
        if check.ttl is not None:
            check.deadline = now + check.ttl
        check.output = output
        if check.status == status:
            return
        check.status = status
        check.critical_since = now if status == "critical" else None
        self._bump()

    def _evaluate(self, now: float) -> None:
        """Expire TTLs, reap services critical for too long."""
        for check in list(self._checks.values()):
            if check.status != "critical" and check.deadline is not None and now >= check.deadline:
                check.status = "critical"
                check.output = "TTL expired"
                check.critical_since = now
                check.deadline = None
                self._bump()
        for check in list(self._checks.values()):
            if (
                check.status == "critical"
                and check.deregister_after is not None
                and check.critical_since is not None
                and now - check.critical_since >= check.deregister_after
                and check.service_id in self._services
            ):
                self._drop_service(check.service_id)
                self._bump()

    def _tick(self) -> None:
        while not self._closed.wait(TICK_SECONDS):
            with self._cond:
                self._evaluate(time.monotonic())


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
