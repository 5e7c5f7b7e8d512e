"""The farm: GET /v1/workers (utilization and queue depth; which team's job runs where for admins).

The /farm page (api.web) renders the same ``farm_state``.
"""

from __future__ import annotations

from flask import Blueprint

from api import auth
from api.context import services
from storage import farm
from storage.teams import Role

bp = Blueprint("farm", __name__)


def farm_state() -> dict:
    """The farm view for the caller: counts for everyone, which team's job runs where for admins."""
    who = auth.require(Role.VIEWER)
    svc = services()
    with svc.db.session() as s:
        return farm.farm_view(s, svc.settings.worker_ttl_seconds, admin=who.is_admin)


@bp.get("/v1/workers")
def list_workers():
    return farm_state()
