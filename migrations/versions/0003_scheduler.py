"""scheduler: the claim fencing counter, the queue index, job runs (fair share), artifacts' store prefix, jobs' retention purge time and memory estimate, registered workers

Revision ID: 0003
Revises: 0002
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claim', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('purged_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('memory_estimate', sa.BigInteger(), nullable=True))
        batch_op.create_index('ix_jobs_queue', ['status', 'team_id', 'priority', 'created_at'], unique=False)
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('store_prefix', sa.String(length=500), nullable=True))
    op.create_table('job_runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('claim', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('ended_at', sa.DateTime(), nullable=True),
    sa.Column('outcome', sa.String(length=20), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_job_runs_job_id', 'job_runs', ['job_id'])
    op.create_index('ix_job_runs_team_ended', 'job_runs', ['team_id', 'ended_at'])
    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('hostname', sa.String(length=200), nullable=False),
    sa.Column('device', sa.String(length=40), nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.Column('methods', sa.JSON(), nullable=False),
    sa.Column('formats', sa.JSON(), nullable=False),
    sa.Column('engine_version', sa.String(length=40), nullable=False),
    sa.Column('current_job_id', sa.String(length=40), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_workers_last_seen_at', 'workers', ['last_seen_at'])


def downgrade() -> None:
    op.drop_index('ix_workers_last_seen_at', table_name='workers')
    op.drop_table('workers')
    op.drop_index('ix_job_runs_team_ended', table_name='job_runs')
    op.drop_index('ix_job_runs_job_id', table_name='job_runs')
    op.drop_table('job_runs')
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_column('store_prefix')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_queue')
        batch_op.drop_column('memory_estimate')
        batch_op.drop_column('purged_at')
        batch_op.drop_column('claim')
