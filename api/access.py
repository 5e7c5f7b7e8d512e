"""Identity endpoints: who am I, teams, API keys and team credentials."""

from __future__ import annotations

import logging

from flask import Blueprint, request

from api import auth
from api.context import services
from api.errors import json_body
from quantfarm.errors import NotFound, ValidationFailed
from storage import teams as team_store
from storage.models import ApiKey, Team
from storage.teams import CREDENTIAL_KINDS, ROLES, Role

log = logging.getLogger(__name__)
bp = Blueprint("access", __name__)

# What each credential kind holds (all write-only).
CREDENTIAL_FIELDS = {"hub": ("token",), "s3": ("access_key_id", "secret_access_key")}


def _fields(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise ValidationFailed({k: "unknown field" for k in extra})


def _opt_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1_000_000:
        raise ValidationFailed({name: "must be an integer from 0 to 1000000"})
    return value


@bp.get("/v1/me")
def me():
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        team = s.get(Team, who.team_id)
        return {"key_id": who.key_id, "team_id": who.team_id, "team": team.name if team else None, "role": who.role.value,
                "local_admin": who.key_id is None}


@bp.post("/v1/teams")
def create_team():
    body = json_body()
    _fields(body, {"name", "max_queued", "max_running"})
    auth.require(Role.ADMIN)
    with services().db.session() as s:
        team = team_store.create_team(s, body.get("name"), max_queued=_opt_int(body, "max_queued"), max_running=_opt_int(body, "max_running"))
        view = team_store.team_view(team)
    log.info("Created team %s (%s)", view["id"], view["name"])
    return view, 201


@bp.get("/v1/teams")
def list_teams():
    auth.require(Role.ADMIN)
    with services().db.session() as s:
        return {"items": [team_store.team_view(t) for t in team_store.list_teams(s)]}


@bp.post("/v1/keys")
def create_key():
    """Make a key: admins for any team and role; members for their own team, member or viewer."""
    body = json_body()
    _fields(body, {"team", "role", "name"})
    role = body.get("role", Role.MEMBER.value)
    if role not in ROLES:
        raise ValidationFailed({"role": f"must be one of {', '.join(ROLES)}"})
    who = auth.require(Role.MEMBER)
    with services().db.session() as s:
        if body.get("team") is None:
            team_id = who.team_id if who.key_id is not None else team_store.ensure_default_team(s)
        elif who.is_admin:
            team_id = team_store.get_team(s, str(body["team"])).id
        else:
            try:
                team_id = team_store.get_team(s, str(body["team"])).id
            except NotFound:
                team_id = None
            if team_id != who.team_id:
                raise NotFound(f"No team {body['team']!r}.", details={"resource": "team", "id": str(body["team"])})
        if Role(role).rank > who.role.rank:
            who.require(Role(role))
        new = team_store.create_key(s, team_id, role=role, name=body.get("name") or "key", created_by=who.key_id)
        view = {**team_store.key_view(new.row, s.get(Team, team_id).name), "key": new.key}
    auth.saw_new_key()
    log.info("Created %s key %s for team %s", role, view["id"], team_id)
    return view, 201


@bp.get("/v1/keys")
def list_keys():
    who = auth.require(Role.MEMBER)
    with services().db.session() as s:
        names = {t.id: t.name for t in team_store.list_teams(s)}
        return {"items": [team_store.key_view(k, names.get(k.team_id)) for k in team_store.list_keys(s, who.scope)]}


@bp.delete("/v1/keys/<key_id>")
def revoke_key(key_id: str):
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        key = s.get(ApiKey, key_id)
        if key is None or (who.scope is not None and key.team_id != who.scope):
            raise NotFound(f"No API key with id {key_id!r}.", details={"resource": "api_key", "id": key_id})
        who.require(Role.MEMBER)
        if Role(key.role).rank > who.role.rank:
            who.require(Role(key.role))
        view = team_store.key_view(team_store.revoke_key(s, key), None)
    auth.forget_key(key_id)
    log.info("Revoked key %s", key_id)
    return view


@bp.post("/v1/credentials")
def put_credential():
    """Store a named team credential (write-only: no response ever shows its secret)."""
    body = json_body()
    kind = body.get("kind")
    if kind not in CREDENTIAL_KINDS:
        raise ValidationFailed({"kind": f"must be one of {', '.join(CREDENTIAL_KINDS)}"})
    needed = CREDENTIAL_FIELDS[kind]
    _fields(body, {"name", "kind", *needed})
    bad = {f: "field required: a non-empty string" for f in needed if not isinstance(body.get(f), str) or not body[f].strip()}
    if bad:
        raise ValidationFailed(bad)
    who = auth.require(Role.MEMBER)
    with services().db.session() as s:
        if who.key_id is None:
            team_store.ensure_default_team(s)
        cred = team_store.put_credential(s, who.team_id, body.get("name"), kind, {f: body[f].strip() for f in needed}, who.key_id)
        view = team_store.credential_view(cred)
    return view, 201


@bp.get("/v1/credentials")
def list_credentials():
    who = auth.require(Role.VIEWER)
    with services().db.session() as s:
        return {"items": [team_store.credential_view(c) for c in team_store.list_credentials(s, who.scope)]}


@bp.delete("/v1/credentials/<name>")
def delete_credential(name: str):
    who = auth.require(Role.VIEWER)
    team = request.args.get("team") if who.is_admin else None
    with services().db.session() as s:
        cred = team_store.get_credential(s, team or who.team_id, name)
        who.require(Role.MEMBER)
        view = team_store.credential_view(cred)
        s.delete(cred)
    return view
