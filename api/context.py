"""What every blueprint needs, found the way flaskr's ``get_db`` finds its database.

Blueprints import ``services()`` from here, never the app factory, so ``api.app``
can import every blueprint without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app

from quantfarm.settings import Settings
from quantfarm.store import BlobStore


@dataclass
class Services:
    """What the views need, built once per app so tests can inject their own."""

    settings: Settings
    db: Any  # storage.db.Database
    dispatcher: Any  # quantfarm.queue.Dispatcher or a stand-in with the same methods
    store: BlobStore


def services() -> Services:
    """Return the current app's services."""
    return current_app.extensions["quantfarm"]
