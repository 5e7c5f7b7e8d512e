"""Everything that runs jobs: the Celery app, thin tasks, the runner and the engine."""
