"""WSGI entry point for production servers: ``gunicorn api.wsgi:app``.

The process's logging is set up here, as ``python -m workers`` sets up a worker's:
every line in ``QUANTFARM_LOG_FORMAT`` (JSON: one object a line, with ``job_id``
and ``attempt`` on the lines a job causes), INFO and up.
"""

from api.app import create_app
from quantfarm.logs import configure
from quantfarm.settings import Settings

settings = Settings()
configure("api", settings.log_format)
app = create_app(settings)
