"""dedup: the result fingerprint of jobs (coalescing) and artifacts (reuse), and the job a result was reused from

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fingerprint', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('reused_from', sa.String(length=40), nullable=True))
        batch_op.create_index('ix_jobs_fingerprint', ['fingerprint', 'status'], unique=False)
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fingerprint', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_artifacts_fingerprint', ['fingerprint'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index('ix_artifacts_fingerprint')
        batch_op.drop_column('fingerprint')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_fingerprint')
        batch_op.drop_column('reused_from')
        batch_op.drop_column('fingerprint')
