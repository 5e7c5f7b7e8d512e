"""Alembic's head schema equals what the SQLAlchemy models declare, on both databases."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from storage.models import Base


@pytest.mark.parametrize("which", ["pg_url", "sqlite_url"])
def test_upgrade_head_matches_models(request, which):
    url = request.getfixturevalue(which)  # both fixtures start from an empty database and run `upgrade head`
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names()) - {"alembic_version"}
        assert tables == set(Base.metadata.tables)
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        cols = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
        assert {"lease_owner", "lease_expires_at", "attempt", "cancel_requested"} <= cols
    engine.dispose()
