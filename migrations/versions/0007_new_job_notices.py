"""New-job notices: on PostgreSQL every INSERT of jobs notifies the channel idle workers listen on

The submit no longer pushes a broker wake-up on PostgreSQL: the database announces
the jobs it stores, in the same transaction (a notice is delivered at the commit,
never for a rolled-back insert), and an idle worker's poller listens
(workers/poller.py). SQLite has no notices: there the API still pushes.

Revision ID: 0007
Revises: 0006
"""
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# storage.notices.NEW_JOBS: the name is fixed in this migration as it was when it ran.
_CHANNEL = 'quantfarm_new_jobs'


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f"""CREATE FUNCTION quantfarm_announce_new_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{_CHANNEL}', '');
    RETURN NULL;
END $$""")
    # Once a statement, whatever its rows (notices of one transaction with the same text are delivered once).
    op.execute("CREATE TRIGGER jobs_announce_new AFTER INSERT ON jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION quantfarm_announce_new_jobs()")


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute("DROP TRIGGER jobs_announce_new ON jobs")
    op.execute("DROP FUNCTION quantfarm_announce_new_jobs()")
