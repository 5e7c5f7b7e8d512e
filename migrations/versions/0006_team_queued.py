"""team_queued: each team's queued jobs, counted as they move, for the submit's quota (filled from the jobs table)

Stop the API and the workers before upgrading: a job that becomes or stops being
queued while this runs is not counted.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('team_queued',
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('slot', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('queued', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('team_id', 'slot'),
    )
    op.execute("INSERT INTO team_queued (team_id, slot, queued) "
               "SELECT team_id, 0, count(*) FROM jobs WHERE status = 'queued' GROUP BY team_id")


def downgrade() -> None:
    op.drop_table('team_queued')
