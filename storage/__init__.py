"""Persistence: SQLAlchemy models, the job state machine, artifact stores."""
