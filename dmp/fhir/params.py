"""Search parameters as the gateway reads them: each one checked, any mistake a 400 that
names the parameter. Parameters the gateway does not support are refused, never ignored:
a filter silently dropped would show a professional more, or less, than they asked for."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from starlette.datastructures import QueryParams

from dmp.errors import InvalidArgument
from dmp.fhir.errors import FhirError, bad_parameter
from dmp.fhir.systems import INS_SYSTEM, LOINC_SYSTEM, RECORD_KIND_SYSTEM
from dmp.ins import normalize_ins
from dmp.records import KIND_VALUES
from dmp.v1 import record_pb2

#: The largest page a client may ask for (_count), and the default.
MAX_COUNT = 200
DEFAULT_COUNT = 50
#: Parameters every search accepts (the response is always JSON).
_FORMATS = {"json", "application/json", "application/fhir+json"}


def check_known(params: QueryParams, known: Iterable[str]) -> None:
    allowed = {*known, "_format"}
    for name in params:
        if name not in allowed:
            raise FhirError(
                400,
                "not-supported",
                f"search parameter {name!r} is not supported here; supported:"
                f" {', '.join(sorted(allowed))} (see /metadata)",
                expression=name,
            )
    for value in params.getlist("_format"):
        if value not in _FORMATS:
            raise bad_parameter("_format", f"{value!r}: this server answers JSON only")


def single(params: QueryParams, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise bad_parameter(name, "give it once")
    return values[0] if values else None


def patient_ins(params: QueryParams, *names: str, required: bool = True) -> str | None:
    """The patient's INS from a token ``urn:oid:1.2.250.1.213.1.4.8|INS`` (the INS-NIR
    system, or none) or from a reference ``Patient/INS``."""
    given = [(name, value) for name in names for value in params.getlist(name)]
    if not given:
        if required:
            raise bad_parameter(names[0], f"required: the patient's INS, as {INS_SYSTEM}|<INS>")
        return None
    if len(given) > 1:
        raise bad_parameter(given[1][0], "give the patient once")
    name, value = given[0]
    if name.endswith(".identifier") or name == "identifier":
        system, bar, ins = value.rpartition("|")
        if bar and system not in ("", INS_SYSTEM):
            raise bad_parameter(
                name, f"identifier system {system!r} is not known here: use {INS_SYSTEM}"
            )
        ins = ins if bar else value
    else:
        ins = value.removeprefix("Patient/")
    return ins_value(name, ins)


def ins_value(name: str, ins: str) -> str:
    try:
        return normalize_ins(ins, name)
    except InvalidArgument as exc:  # its message names the parameter already
        raise FhirError(400, "invalid", exc.message, expression=name) from None


def count(params: QueryParams) -> int:
    raw = single(params, "_count")
    if raw is None:
        return DEFAULT_COUNT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_COUNT:
        raise bad_parameter("_count", f"{raw!r} must be a whole number from 1 to {MAX_COUNT}")
    return int(raw)


def type_codes(params: QueryParams, name: str = "type") -> list[str]:
    """LOINC codes (``http://loinc.org|11488-4`` or ``11488-4``; comma means or)."""
    codes = []
    for value in params.getlist(name):
        for token in value.split(","):
            system, bar, code = token.rpartition("|")
            if bar and system not in ("", LOINC_SYSTEM):
                raise bad_parameter(
                    name, f"system {system!r} is not known here: use {LOINC_SYSTEM}"
                )
            code = code if bar else token
            if not code.strip() or len(code) > 64:
                raise bad_parameter(
                    name, f"{token!r} is not a type code (e.g. {LOINC_SYSTEM}|11488-4)"
                )
            codes.append(code)
    return codes


def kinds(params: QueryParams, name: str = "category") -> list[record_pb2.RecordKind.ValueType]:
    out = []
    for value in params.getlist(name):
        for token in value.split(","):
            system, bar, code = token.rpartition("|")
            if bar and system not in ("", RECORD_KIND_SYSTEM):
                raise bad_parameter(
                    name, f"system {system!r} is not known: use {RECORD_KIND_SYSTEM}"
                )
            code = code if bar else token
            if code not in KIND_VALUES:
                raise bad_parameter(name, f"{code!r} is not one of {', '.join(KIND_VALUES)}")
            out.append(KIND_VALUES[code])
    return out


@dataclass
class DateRange:
    since: datetime | None = None
    until: datetime | None = None


_PREFIXES = ("ge", "gt", "le", "lt", "eq")


def _parse_when(name: str, raw: str) -> tuple[datetime, timedelta]:
    """The start of a FHIR date/dateTime value and how long it lasts (a day for a date)."""
    try:
        if len(raw) == 4 and raw.isdigit():
            start = datetime(int(raw), 1, 1, tzinfo=UTC)
            return start, datetime(int(raw) + 1, 1, 1, tzinfo=UTC) - start
        if len(raw) == 7:
            year, month = int(raw[:4]), int(raw[5:7])
            start = datetime(year, month, 1, tzinfo=UTC)
            end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
            return start, end - start
        if len(raw) == 10:
            return datetime.combine(date.fromisoformat(raw), datetime.min.time(), UTC), timedelta(
                days=1
            )
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise bad_parameter(
            name, f"{raw!r} is not a date (YYYY, YYYY-MM, YYYY-MM-DD or an ISO 8601 instant)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment, timedelta(microseconds=1)


def date_range(params: QueryParams, *names: str) -> DateRange:
    """``date=ge2024-01-01&date=lt2025`` as the view's since (inclusive) and until
    (exclusive); prefixes ge, gt, le, lt, eq (the default)."""
    out = DateRange()
    for name in names:
        for value in params.getlist(name):
            prefix, raw = (value[:2], value[2:]) if value[:2] in _PREFIXES else ("eq", value)
            start, length = _parse_when(name, raw)
            if start > datetime.max.replace(tzinfo=UTC) - length:  # its end is past year 9999
                raise bad_parameter(name, f"{raw!r} is past the last date this server knows")
            if prefix in ("ge", "eq"):
                out.since = max(filter(None, (out.since, start)))
            if prefix == "gt":
                out.since = max(filter(None, (out.since, start + length)))
            if prefix in ("lt",):
                out.until = min(filter(None, (out.until, start)))
            if prefix in ("le", "eq"):
                out.until = min(filter(None, (out.until, start + length)))
    return out


@dataclass
class Statuses:
    """Which versions the client wants: current only (the default), or superseded too."""

    wanted: set[str] = field(default_factory=lambda: {"current"})

    @property
    def include_superseded(self) -> bool:
        return "superseded" in self.wanted


def statuses(params: QueryParams) -> Statuses:
    values = [t for v in params.getlist("status") for t in v.split(",")]
    if not values:
        return Statuses()
    for value in values:
        if value not in ("current", "superseded"):
            raise bad_parameter(
                "status",
                f"{value!r}: records are current or superseded (nothing is entered in error)",
            )
    return Statuses(set(values))


def page_token(params: QueryParams) -> str:
    token = single(params, "_page_token") or ""
    if len(token) > 4096 or not all(c.isalnum() or c in "-_" for c in token):
        raise bad_parameter("_page_token", "pass the next link's token unchanged")
    return token
