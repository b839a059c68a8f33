"""Core SELECTs compiled once for an engine's dialect, then run on the driver's own cursor.

SQLAlchemy's execute path costs, on every call, a cache-key walk of the statement, an
execution context and a result object: for a read of a few rows, more than the query. A
Prepared statement pays the compilation once (IN lists rendered, so the SQL is final) and
each call then runs the driver's execute with the same bind and result conversions
SQLAlchemy would apply, giving tuples with attribute access (`row.id`, `row._fields`).

It runs on a Connection's driver connection, in whatever transaction that connection is
in: none on SQLite (the one statement is its own snapshot), the connection's own when the
caller began one for several statements.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select
from sqlalchemy.engine import Connection, Dialect


@dataclass(frozen=True, slots=True)
class Prepared:
    """One SELECT in its dialect's SQL, with what it takes to bind and read it."""

    sql: str
    #: The parameters in their order for a positional paramstyle; None for a named one.
    order: tuple[str, ...] | None
    #: The values compiled into the statement (IN lists, LIMIT), by parameter name.
    defaults: Mapping[str, Any]
    #: Bind conversions of the dialect, by parameter name (only those that have one).
    binds: Mapping[str, Callable[[Any], Any]]
    #: Result conversions by column position (only those that have one).
    results: tuple[tuple[int, Callable[[Any], Any]], ...]
    row: Callable[..., Any]

    def fetch(self, connection: Connection, params: Mapping[str, Any]) -> list[Any]:
        """The rows for these parameter values, on the connection's driver connection."""
        values = dict(self.defaults)
        values.update(params)
        for name, convert in self.binds.items():
            if name in values:
                values[name] = convert(values[name])
        args: Any = values if self.order is None else tuple(values[n] for n in self.order)
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self.sql, args)
            fetched = cursor.fetchall()
        finally:
            cursor.close()
        make = self.row
        if not self.results:
            return [make(*values) for values in fetched]
        rows = []
        for raw in fetched:
            converted = list(raw)
            for index, convert in self.results:
                converted[index] = convert(converted[index])
            rows.append(make(*converted))
        return rows


def prepare(stmt: Select[*tuple[Any, ...]], dialect: Dialect, name: str = "Row") -> Prepared:
    """Compile `stmt` for `dialect` once; its bind parameters without a value stay
    parameters, those with one (IN lists, LIMIT) are expanded and kept as defaults."""
    compiled = stmt.compile(dialect=dialect)
    # The expansion needs a value for every parameter: the call's are None here.
    required = {key for key, bind in compiled.binds.items() if bind.required}
    expanded = compiled.construct_expanded_state({key: None for key in required})
    defaults = {
        key: value
        for key, value in expanded.parameters.items()
        if key not in required and value is not None
    }
    binds = dict(expanded.processors)
    columns = list(stmt.selected_columns)
    results = []
    for index, column in enumerate(columns):
        convert = column.type.dialect_impl(dialect).result_processor(dialect, None)
        if convert is not None:
            results.append((index, convert))
    positional = expanded.positiontup
    return Prepared(
        sql=expanded.statement,
        order=tuple(positional) if dialect.positional and positional is not None else None,
        defaults=defaults,
        binds=binds,
        results=tuple(results),
        row=namedtuple(name, [column.key for column in columns]),  # type: ignore[misc]
    )
