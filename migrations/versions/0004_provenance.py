"""provenance: the source commit and the source files' hashes on each artifact

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_revision', sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column('source_files', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_column('source_files')
        batch_op.drop_column('source_revision')
