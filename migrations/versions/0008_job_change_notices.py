"""Job-change notices: on PostgreSQL every change to a job's row or its artifacts notifies the job's id

An API process keeps the rows of the jobs it answered (storage/job_cache.py) and
forgets a job's at its notice: every UPDATE or DELETE of jobs, and every INSERT,
UPDATE or DELETE of artifacts, notifies the job's id in the writing transaction
(delivered at its commit, never for a rolled-back change); a TRUNCATE of either
table notifies '*' (every job). SQLite has no notices: nothing is kept there.

Revision ID: 0008
Revises: 0007
"""
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# storage.job_cache.JOB_CHANGES: the name is fixed in this migration as it was when it ran.
_CHANNEL = 'quantfarm_job_changes'


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f"""CREATE FUNCTION quantfarm_job_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('{_CHANNEL}', '*');
    ELSIF TG_TABLE_NAME = 'jobs' THEN
        PERFORM pg_notify('{_CHANNEL}', OLD.id);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('{_CHANNEL}', OLD.job_id);
    ELSE
        PERFORM pg_notify('{_CHANNEL}', NEW.job_id);
        IF TG_OP = 'UPDATE' AND OLD.job_id IS DISTINCT FROM NEW.job_id THEN
            PERFORM pg_notify('{_CHANNEL}', OLD.job_id);
        END IF;
    END IF;
    RETURN NULL;
END $$""")
    # Notices of one transaction with the same text are delivered once: a job changed twice is one notice.
    op.execute("CREATE TRIGGER jobs_changed AFTER UPDATE OR DELETE ON jobs "
               "FOR EACH ROW EXECUTE FUNCTION quantfarm_job_changed()")
    op.execute("CREATE TRIGGER artifacts_changed AFTER INSERT OR UPDATE OR DELETE ON artifacts "
               "FOR EACH ROW EXECUTE FUNCTION quantfarm_job_changed()")
    for table in ('jobs', 'artifacts'):
        op.execute(f"CREATE TRIGGER {table}_truncated AFTER TRUNCATE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION quantfarm_job_changed()")


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for trigger, table in (('jobs_changed', 'jobs'), ('artifacts_changed', 'artifacts'),
                           ('jobs_truncated', 'jobs'), ('artifacts_truncated', 'artifacts')):
        op.execute(f"DROP TRIGGER {trigger} ON {table}")
    op.execute("DROP FUNCTION quantfarm_job_changed()")
