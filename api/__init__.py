"""The HTTP face of the farm: a Flask app factory with one blueprint per module."""

from api.app import create_app, serve

__all__ = ["create_app", "serve"]
