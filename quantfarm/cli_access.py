"""``quantfarm teams``, ``quantfarm keys`` and ``quantfarm secrets``: identity from the command line.

Teams and keys go through the API with QUANTFARM_API_KEY. ``keys create --local``
writes straight to the database instead: that is how the first admin key of a
farm is made (whoever can reach the database is its operator already).
"""

from __future__ import annotations

import json

from quantfarm.client import Client

ROLES = ("admin", "member", "viewer")


def _print_rows(rows: list[dict], cols: tuple[str, ...]) -> None:
    widths = {c: max([len(c), *(len(str(r.get(c) if r.get(c) is not None else "-")) for r in rows)]) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(widths[c]) for c in cols))


def _show_new_key(view: dict) -> None:
    print(view["key"])
    print(f"# {view['role']} key {view['id']} for team {view.get('team') or view['team_id']}: store it now, it is not shown again.")


def cmd_teams_create(a, settings) -> int:
    body = {"name": a.name, "max_queued": a.max_queued, "max_running": a.max_running}
    team = Client.from_settings(settings).post("/v1/teams", {k: v for k, v in body.items() if v is not None})
    print(f"team {team['name']} ({team['id']}) created")
    return 0


def cmd_teams_list(a, settings) -> int:
    page = Client.from_settings(settings).get("/v1/teams")
    if a.json:
        print(json.dumps(page, indent=2))
    else:
        _print_rows(page["items"], ("id", "name", "max_queued", "max_running"))
    return 0


def cmd_keys_create(a, settings) -> int:
    if a.local:
        view = create_key_locally(settings, team=a.team or "default", role=a.role, name=a.name)
    else:
        body = {"role": a.role, "name": a.name, **({"team": a.team} if a.team else {})}
        view = Client.from_settings(settings).post("/v1/keys", body)
    _show_new_key(view)
    return 0


def create_key_locally(settings, *, team: str, role: str, name: str) -> dict:
    """Make a key straight in the database (creating the team if needed); return its view with the key."""
    from quantfarm.errors import NotFound
    from storage import teams as team_store
    from storage.db import Database
    from storage.migrate import upgrade

    upgrade(settings.resolved_database_url)
    db = Database.from_settings(settings)
    try:
        with db.session() as s:
            if team == "default":
                team_store.ensure_default_team(s)
            try:
                t = team_store.get_team(s, team)
            except NotFound:
                t = team_store.create_team(s, team)
            new = team_store.create_key(s, t.id, role=role, name=name)
            return {**team_store.key_view(new.row, t.name), "key": new.key}
    finally:
        db.dispose()


def cmd_keys_list(a, settings) -> int:
    page = Client.from_settings(settings).get("/v1/keys")
    if a.json:
        print(json.dumps(page, indent=2))
    else:
        _print_rows(page["items"], ("id", "team", "name", "role", "last_used_at", "revoked"))
    return 0


def cmd_keys_revoke(a, settings) -> int:
    view = Client.from_settings(settings).delete(f"/v1/keys/{a.key_id}")
    print(f"key {view['id']} revoked")
    return 0


def cmd_secrets_new_key(a, settings) -> int:
    from quantfarm.secrets import new_key

    print(new_key())
    return 0


def cmd_secrets_rotate(a, settings) -> int:
    from storage.db import Database
    from storage.teams import rotate_secrets

    db = Database.from_settings(settings)
    try:
        n = rotate_secrets(db)
    finally:
        db.dispose()
    print(f"{n} stored secrets re-encrypted under the first key of QUANTFARM_SECRET_KEY; the other keys can go now")
    return 0


def add_commands(sub) -> None:
    """Add the teams, keys and secrets commands to the ``quantfarm`` parser."""
    t = sub.add_parser("teams", help="create and list teams (admin)").add_subparsers(dest="teams_command", required=True, metavar="ACTION")
    c = t.add_parser("create", help="create a team")
    c.add_argument("name")
    c.add_argument("--max-queued", type=int, help="queued-job quota (default: the farm's)")
    c.add_argument("--max-running", type=int, help="running-job limit the scheduler enforces")
    c.set_defaults(func=cmd_teams_create)
    ls = t.add_parser("list", help="list teams")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_teams_list)

    k = sub.add_parser("keys", help="create, list and revoke API keys").add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    c = k.add_parser("create", help="create an API key; it is printed once")
    c.add_argument("--team", help="team name or id (default: your key's team; with --local: 'default')")
    c.add_argument("--role", choices=ROLES, default="member")
    c.add_argument("--name", default="key", help="a label for the key")
    c.add_argument("--local", action="store_true",
                   help="write to the database at QUANTFARM_DATABASE_URL directly (the farm's first admin key)")
    c.set_defaults(func=cmd_keys_create)
    ls = k.add_parser("list", help="list keys (never the keys themselves)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_keys_list)
    r = k.add_parser("revoke", help="revoke a key")
    r.add_argument("key_id")
    r.set_defaults(func=cmd_keys_revoke)

    sc = sub.add_parser("secrets", help="the key that encrypts stored secrets").add_subparsers(
        dest="secrets_command", required=True, metavar="ACTION")
    sc.add_parser("new-key", help="print a fresh key for QUANTFARM_SECRET_KEY").set_defaults(func=cmd_secrets_new_key)
    sc.add_parser("rotate", help="re-encrypt stored secrets under the first key of QUANTFARM_SECRET_KEY").set_defaults(
        func=cmd_secrets_rotate)

