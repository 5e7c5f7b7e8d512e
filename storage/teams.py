"""Teams, API keys and team credentials in the database.

An API key reads ``qf_<key id>_<secret>``. Only the SHA-256 of the secret part is
stored (the secret is 256 random bits, so a plain hash is as strong as a slow
one), and the key is shown once, when it is made.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets as pysecrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from quantfarm.errors import InvalidState, NotFound, ValidationFailed
from storage.models import DEFAULT_TEAM_ID, ApiKey, Credential, Team, new_id, utcnow

KEY_PREFIX = "qf_"
_KEY = re.compile(r"^qf_(key_[0-9a-z]{26})_([A-Za-z0-9_-]{43})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Role(str, enum.Enum):
    VIEWER = "viewer"
    MEMBER = "member"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return ROLE_RANK[self]


ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2}
ROLES = tuple(r.value for r in Role)
CREDENTIAL_KINDS = ("hub", "s3")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(value: str, field: str = "name") -> str:
    """Return a team, key or credential name, or raise ValidationFailed."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValidationFailed({field: "must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"})
    return value


# --- teams -------------------------------------------------------------------------------


def ensure_default_team(s: Session) -> str:
    """Return the default team's id, creating the team on first use."""
    if s.get(Team, DEFAULT_TEAM_ID) is None:
        s.add(Team(id=DEFAULT_TEAM_ID, name="default", created_at=utcnow()))
        s.flush()
    return DEFAULT_TEAM_ID


def create_team(s: Session, name: str, *, max_queued: int | None = None, max_running: int | None = None) -> Team:
    """Insert a team; raise InvalidState (409) when the name is taken."""
    check_name(name)
    if s.scalar(select(Team.id).where(Team.name == name)) is not None:
        raise InvalidState(f"A team named {name!r} exists already.", details={"name": name})
    team = Team(id=new_id("team"), name=name, max_queued=max_queued, max_running=max_running, created_at=utcnow())
    s.add(team)
    s.flush()
    return team


def get_team(s: Session, ref: str) -> Team:
    """Return a team by id or name, or raise NotFound."""
    team = s.get(Team, ref) or s.scalars(select(Team).where(Team.name == ref)).one_or_none()
    if team is None:
        raise NotFound(f"No team {ref!r}.", details={"resource": "team", "id": ref})
    return team


def list_teams(s: Session) -> list[Team]:
    return list(s.scalars(select(Team).order_by(Team.name)))


# --- API keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    key: str  # shown once


def create_key(s: Session, team_id: str, *, role: str, name: str, created_by: str | None = None) -> NewKey:
    """Make an API key for ``team_id``; the returned key is the only copy."""
    if role not in ROLES:
        raise ValidationFailed({"role": f"must be one of {', '.join(ROLES)}"})
    check_name(name)
    key_id = new_id("key")
    secret = pysecrets.token_urlsafe(32)
    row = ApiKey(id=key_id, team_id=team_id, name=name, role=role, secret_hash=_hash(secret), created_at=utcnow(), created_by=created_by)
    s.add(row)
    s.flush()
    return NewKey(row, f"{KEY_PREFIX}{key_id}_{secret}")


def key_id_of(key: str) -> str | None:
    """Return the key id inside a well-formed key string, else None."""
    m = _KEY.match(key)
    return m.group(1) if m else None


def verify_key(s: Session, key: str) -> ApiKey | None:
    """Return the live key row matching ``key``, or None (unknown, malformed or revoked)."""
    m = _KEY.match(key)
    if not m:
        return None
    row = s.get(ApiKey, m.group(1))
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.secret_hash, _hash(m.group(2))):
        return None
    return row


def touch_key(s: Session, key_id: str, at: datetime) -> None:
    s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=at).execution_options(synchronize_session=False))


def any_key_exists(s: Session) -> bool:
    return s.scalar(select(func.count()).select_from(ApiKey)) > 0


def list_keys(s: Session, team_id: str | None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.created_at)
    if team_id is not None:
        stmt = stmt.where(ApiKey.team_id == team_id)
    return list(s.scalars(stmt))


def revoke_key(s: Session, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        s.flush()
    return key


def key_view(k: ApiKey, team_name: str | None = None) -> dict[str, Any]:
    from storage.views import iso

    return {
        "id": k.id, "team_id": k.team_id, "team": team_name, "name": k.name, "role": k.role,
        "created_at": iso(k.created_at), "created_by": k.created_by, "last_used_at": iso(k.last_used_at),
        "revoked_at": iso(k.revoked_at), "revoked": k.revoked_at is not None,
    }


def team_view(t: Team) -> dict[str, Any]:
    from storage.views import iso

    return {"id": t.id, "name": t.name, "max_queued": t.max_queued, "max_running": t.max_running, "created_at": iso(t.created_at)}


# --- credentials -------------------------------------------------------------------------


def put_credential(s: Session, team_id: str, name: str, kind: str, secret: dict[str, str], created_by: str | None) -> Credential:
    """Create or replace a team's named credential (stored encrypted)."""
    check_name(name)
    row = s.scalars(select(Credential).where(Credential.team_id == team_id, Credential.name == name)).one_or_none()
    now = utcnow()
    if row is None:
        row = Credential(id=new_id("cred"), team_id=team_id, name=name, kind=kind, secret=secret, created_at=now,
                         updated_at=now, created_by=created_by)
        s.add(row)
    else:
        row.kind, row.secret, row.updated_at = kind, secret, now
    try:
        s.flush()
    except IntegrityError:  # a concurrent create of the same name
        s.rollback()
        raise InvalidState(f"Credential {name!r} was created concurrently; try again.") from None
    return row


def get_credential(s: Session, team_id: str, name: str) -> Credential:
    row = s.scalars(select(Credential).where(Credential.team_id == team_id, Credential.name == name)).one_or_none()
    if row is None:
        raise NotFound(f"Your team has no credential named {name!r}.", details={"resource": "credential", "name": name})
    return row


def list_credentials(s: Session, team_id: str | None) -> list[Credential]:
    stmt = select(Credential).order_by(Credential.team_id, Credential.name)
    if team_id is not None:
        stmt = stmt.where(Credential.team_id == team_id)
    return list(s.scalars(stmt))


def credential_view(c: Credential) -> dict[str, Any]:
    """The credential without its secret (write-only)."""
    from storage.views import iso

    return {"id": c.id, "team_id": c.team_id, "name": c.name, "kind": c.kind, "created_at": iso(c.created_at),
            "updated_at": iso(c.updated_at), "created_by": c.created_by}


def rotate_secrets(db) -> int:
    """Re-encrypt every job secret and credential under the newest key; return how many rows changed.

    Run after putting a new key in front of QUANTFARM_SECRET_KEY; then the old key can go.
    """
    from storage.models import Job

    n = 0
    with db.session() as s:
        for model, column in ((Job, Job.secrets), (Credential, Credential.secret)):
            for row_id, value in s.execute(select(model.id, column)).all():
                if value:
                    # Reading decrypted it with whichever key fits; writing seals it with the newest.
                    s.execute(update(model).where(model.id == row_id).values({column.key: dict(value)}))
                    n += 1
    return n


def job_credentials(s: Session, job) -> dict[str, Any]:
    """Return the secrets a job's ``credentials_ref`` fields name, keyed like its own secrets.

    Only the job's own team's credentials are looked up; a credential deleted since submit
    fails the job with a clear error instead of falling back to anything else.
    """
    spec = job.spec or {}
    wanted = {
        "model": (spec.get("model") or {}).get("credentials_ref"),
        "destination.hub": ((spec.get("destination") or {}).get("hub") or {}).get("credentials_ref"),
        "calibration": (spec.get("calibration") or {}).get("credentials_ref"),
    }
    out: dict[str, Any] = {}
    for where, name in wanted.items():
        if not name:
            continue
        row = s.scalars(select(Credential).where(Credential.team_id == job.team_id, Credential.name == name)).one_or_none()
        if row is None:
            from quantfarm.errors import JobError

            raise JobError(f"The team credential {name!r} named by {where}.credentials_ref no longer exists; add it again "
                           "with POST /v1/credentials and retry the job.", code="credential_missing")
        if row.kind == "hub":
            out[f"{where}.token"] = row.secret["token"]
        else:
            out[f"{where}.s3"] = dict(row.secret)
    return out
