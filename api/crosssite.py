"""Refuse state-changing requests that a browser sends on behalf of another site.

The pages and the API take no credentials yet, so the farm's own address is the
only thing that guards it: a page elsewhere could otherwise make a visitor's
browser submit, cancel or retry jobs on a farm inside their network (a form
post, or a ``text/plain`` body that happens to parse as JSON). Browsers say
where a request comes from: ``Sec-Fetch-Site`` (every current engine) and, for
older ones, ``Origin``. Clients that are not browsers (the CLI, curl, CI) send
neither and are not affected.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, request

from quantfarm.errors import Forbidden

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ALLOWED_SITES = frozenset({"same-origin", "none"})  # "none": typed into the address bar, a bookmark


def check_request() -> None:
    """Raise Forbidden for an unsafe request that a browser sent from another origin."""
    if request.method in SAFE_METHODS:
        return
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        if site not in ALLOWED_SITES:
            raise Forbidden(
                f"Refused a {request.method} sent by a page on another site ({site}); open the farm's own pages to do this.",
                details={"sec_fetch_site": site},
            )
        return
    origin = request.headers.get("Origin")
    # Compare hosts only: a TLS-terminating proxy in front changes the scheme the app sees.
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise Forbidden(
            "Refused a request sent by a page on another origin; open the farm's own pages to do this.",
            details={"origin": origin[:200]},
        )


def register(app: Flask) -> None:
    app.before_request(check_request)
