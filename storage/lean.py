"""The API's hottest statements, run on the pooled connection's own driver cursor (PostgreSQL).

A ``Fixed`` statement is a Core statement compiled once per engine, with its
bind processors (JSON, encryption, UTC timestamps) looked up once too; each run
is one psycopg ``execute`` on the connection SQLAlchemy checked out, in the
transaction that connection is in. SQLAlchemy's execute and result layers cost
several times the driver's own work on these one-row statements (for a
35-column SELECT psycopg also built a column description per column for them).
A driver error is raised as SQLAlchemy's would be (``DBAPIError`` and its
subclasses), with a dead connection invalidated, so the API's 503 handling and
the pool's recovery see no difference. ``write_together`` sends several writes
as one transaction in one round trip (a pipeline). On SQLite (the embedded farm) the
statement goes through SQLAlchemy as usual.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Dialect


class Fixed:
    """A statement whose shape never changes (``keys``: an INSERT's columns, all given on every run)."""

    def __init__(self, stmt, keys: tuple[str, ...] | None = None):
        self.stmt, self.keys = stmt, keys
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _for(self, dialect: Dialect) -> tuple[str, dict[str, Any], tuple]:
        got = self._compiled.get(dialect)
        if got is None:
            compiled = self.stmt.compile(dialect=dialect, column_keys=list(self.keys) if self.keys else None)
            assert not compiled.positiontup and not compiled.post_compile_params  # the named dict is sent as is
            literals = {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required}
            processors = tuple((name, proc) for name, bind in compiled.binds.items()
                               if (proc := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None)
            got = self._compiled[dialect] = (str(compiled), literals, processors)
        return got

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[Any]:
        """Every row (tuples in the statement's column order; PostgreSQL's timestamps naive UTC, as stored)."""
        if conn.dialect.name != "postgresql":
            return conn.execute(self.stmt, params).all()
        return self._run(conn, params, fetch=True)

    def run(self, conn: Connection, params: dict[str, Any]) -> None:
        """Execute a write; any RETURNING is ignored."""
        if conn.dialect.name != "postgresql":
            conn.execute(self.stmt, params)
            return
        self._run(conn, params, fetch=False)

    def _bound(self, dialect: Dialect, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        sql, literals, processors = self._for(dialect)
        values = {**literals, **params} if literals else dict(params)
        for name, proc in processors:
            values[name] = proc(values[name])
        return sql, values

    def _run(self, conn: Connection, params: dict[str, Any], fetch: bool) -> list[Any]:
        sql, values = self._bound(conn.dialect, params)
        dbapi_conn = conn.connection.dbapi_connection
        try:
            cur = kept_cursor(conn)
            cur.execute(sql, values)
            return cur.fetchall() if fetch else []
        except conn.dialect.loaded_dbapi.Error as err:
            raise wrapped(conn, dbapi_conn, err, sql, values) from err


def kept_cursor(conn: Connection):
    """A psycopg cursor kept with ``conn``'s pooled connection for its life, made at its first use.

    A cursor holds psycopg's adapters and the dumpers and loaders it looked up for
    the types a statement sends and reads; a new cursor a statement made it look
    them all up again (with the cursor itself, about a tenth of a GET's CPU). A
    pooled connection serves one checkout, so one thread, at a time. A statement's
    rows stay with the cursor until its next statement.
    """
    dbapi_conn = conn.connection.dbapi_connection
    info = conn.connection.info
    cur = info.get("lean_cursor")
    if cur is None or cur.closed or cur.connection is not dbapi_conn:
        cur = info["lean_cursor"] = dbapi_conn.cursor()
    return cur


def write_together(conn: Connection, writes: list[tuple[Fixed, dict[str, Any]]]) -> None:
    """Run the writes as one transaction, committed on return, in one round trip; ``conn``: PostgreSQL, autocommit.

    The statements go in one psycopg pipeline with one sync: PostgreSQL runs what
    comes before a sync as one implicit transaction, so either every row is
    committed (durably, as any commit) or, when one statement fails, none is.
    The BEGIN, each statement and the COMMIT were a round trip each.
    """
    assert conn.connection.dbapi_connection.autocommit, "write_together needs an autocommit connection"
    bound = [fixed._bound(conn.dialect, params) for fixed, params in writes]
    dbapi_conn = conn.connection.dbapi_connection
    try:
        with dbapi_conn.pipeline(), dbapi_conn.cursor() as cur:
            for sql, values in bound:
                cur.execute(sql, values)
    except conn.dialect.loaded_dbapi.Error as err:  # raised at the sync: it names no one statement
        raise wrapped(conn, dbapi_conn, err, "; ".join(sql for sql, _ in bound), {}) from err


def wrapped(conn: Connection, dbapi_conn, err: Exception, sql: str, values: dict[str, Any]) -> sa_exc.DBAPIError:
    """The error SQLAlchemy's execute would raise for the driver's ``err``, with a dead connection invalidated."""
    invalidated = conn.dialect.is_disconnect(err, dbapi_conn, None)
    if invalidated:
        conn.invalidate()
    return sa_exc.DBAPIError.instance(sql, values, err, conn.dialect.loaded_dbapi.Error, hide_parameters=True,
                                      connection_invalidated=invalidated, dialect=conn.dialect)
