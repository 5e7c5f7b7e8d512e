"""The Flask app factory and the embedded HTTP server."""

from __future__ import annotations

import importlib
import json
import json.encoder
import logging
import signal
import threading
from typing import Any

from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider
from werkzeug.serving import BaseWSGIServer, make_server

from quantfarm.settings import Settings
from api.context import Services

_c_make_encoder = json.encoder.c_make_encoder  # None without the C accelerator

log = logging.getLogger(__name__)

# Each module exposes ``bp``; adding the web pages is one line here ("api.web").
BLUEPRINT_MODULES = (
    "api.jobs",
    "api.access",
    "api.artifacts",
    "api.uploads",
    "api.farm",
    "api.webhooks",
    "api.service",
    "api.openapi",
    "api.web",
)

DEFAULT_CONFIG: dict[str, Any] = {
    # Largest calibration file POST /v1/uploads accepts.
    "MAX_UPLOAD_BYTES": 64 * 1024 * 1024,
    # Largest JSON body or form; big calibration sets go through POST /v1/uploads, which sets its own limit.
    "MAX_CONTENT_LENGTH": 1024 * 1024,
    "JOBS_PAGE_MAX": 200,
}


class LeanJSON(DefaultJSONProvider):
    """Flask's JSON responses, byte for byte, from one encoder per app (Flask builds a ``json.JSONEncoder`` per response)."""

    sort_keys = False  # the views' own order
    _encoder: json.JSONEncoder | None = None
    _c_encode = None

    def response(self, *args: Any, **kwargs: Any) -> Response:
        text = self.compact_text(self._prepare_response_obj(args, kwargs))
        if text is None:
            return super().response(*args, **kwargs)  # indented
        return self._app.response_class(text, mimetype=self.mimetype)

    def compact_text(self, obj: Any) -> str | None:
        """The body ``response`` gives ``obj``; None when responses are indented (debug)."""
        if (self.compact is None and self._app.debug) or self.compact is False:
            return None
        encoder = self._encoder
        if encoder is None:
            encoder = self._encoder = json.JSONEncoder(default=self.default, ensure_ascii=self.ensure_ascii,
                                                       sort_keys=self.sort_keys, separators=(",", ":"))
        if _c_make_encoder is None:
            return f"{encoder.encode(obj)}\n"
        encode = self._c_encode
        if encode is None:
            # What encoder.encode runs, made once: it builds this C encoder (and a closure) on every call, ~2 µs,
            # which a page whose items are encoded one by one (api/fastpath.py) paid 20 times. Only a cyclic
            # object, which no view is, fails differently (RecursionError, not ValueError).
            encode = self._c_encode = _c_make_encoder(
                None, encoder.default, json.encoder.encode_basestring_ascii if self.ensure_ascii else json.encoder.encode_basestring,
                None, ":", ",", self.sort_keys, False, True)
        return "".join(encode(obj, 0)) + "\n"


def create_app(settings: Settings | None = None, *, db=None, dispatcher=None, store=None) -> Flask:
    """Build the API app; missing services are built from ``settings``."""
    from api import auth, crosssite, errors, fastpath, service

    settings = settings or Settings()
    if db is None:
        from storage.db import Database

        db = Database.from_settings(settings)
    if dispatcher is None:
        from quantfarm.queue import Dispatcher

        dispatcher = Dispatcher(settings)
    if store is None:
        from storage.artifacts import make_store

        store = make_store(settings)

    app = Flask(__name__)
    app.json = LeanJSON(app)
    app.config.from_mapping(DEFAULT_CONFIG)
    app.config["MAX_UPLOAD_BYTES"] = settings.max_upload_bytes
    db.notify_webhook = dispatcher.deliver_webhook  # a cancel here ends a job: send its webhooks after commit
    app.extensions["quantfarm"] = Services(settings=settings, db=db, dispatcher=dispatcher, store=store)
    errors.register(app)
    crosssite.register(app)
    auth.register(app)
    service.register_request_metrics(app)
    service.register_health(app)
    for name in BLUEPRINT_MODULES:
        app.register_blueprint(importlib.import_module(name).bp)
    fastpath.install(app)  # the plain GETs of /healthz and jobs, answered before Flask (api/fastpath.py)
    return app


def build_server(app: Flask, host: str, port: int) -> BaseWSGIServer:
    """Bind a threaded werkzeug server for ``app`` (port 0 picks a free port)."""
    return make_server(host, port, app, threaded=True)


def serve(settings: Settings, app: Flask | None = None) -> int:
    """Serve the API on settings.host:settings.port until Ctrl-C or SIGTERM; return 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = app or create_app(settings)
    server = build_server(app, settings.host, settings.port)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    log.info("Quantfarm API listening on http://%s:%s", settings.host, server.server_port)
    try:
        server.serve_forever()  # werkzeug's returns on KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    log.info("API server stopped")
    return 0


def _raise_interrupt(signum, frame):
    # serve_forever blocks the main thread; unwinding it is the clean way out.
    raise KeyboardInterrupt
