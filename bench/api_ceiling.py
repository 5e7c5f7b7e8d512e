"""The ceiling for bench/api_load.py: a trivial Flask JSON endpoint, served by the same gunicorn settings."""

from flask import Flask

app = Flask(__name__)


@app.get("/ping")
def ping():
    return {"status": "ok"}
