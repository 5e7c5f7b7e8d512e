"""Engine and session factory for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import contextlib
from typing import Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, **kwargs) -> Engine:
    """Create an engine with the settings each backend needs for many processes."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL lets the API read while a worker writes
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # hide_parameters: a job row's bound values hold secrets; keep them out of error messages and logs.
    return create_engine(url, pool_pre_ping=True, hide_parameters=True, **kwargs)


def after_commit(s: Session, fn) -> None:
    """Run ``fn`` after the session's transaction commits (dropped on rollback)."""
    s.info.setdefault("after_commit", []).append(fn)


class Database:
    """An engine plus a session factory; one per process."""

    def __init__(self, url: str, keyring=None):
        self.url = url
        # Called with a delivery id after a commit that created it (set by processes that can enqueue).
        self.notify_webhook = None
        self.engine = make_engine(url)
        # Encrypts job secrets and team credentials (storage.models.EncryptedJSON reads it here).
        self.engine.dialect.quantfarm_keyring = keyring
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings) -> "Database":
        """Open the farm's database with the key ring its settings name."""
        from quantfarm.secrets import keyring_from_settings

        return cls(settings.resolved_database_url, keyring=keyring_from_settings(settings))

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """Yield a session that commits on success and rolls back on error.

        Callbacks registered with ``after_commit`` run once the commit succeeded
        (enqueue only after the transaction that created the work commits).
        """
        s = self.sessions()
        s.info["notify_webhook"] = self.notify_webhook
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            callbacks = s.info.pop("after_commit", [])
            s.close()
        for fn in callbacks:
            fn()

    def ping(self) -> bool:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True

    def dispose(self) -> None:
        self.engine.dispose()
