"""teams, API keys, team credentials; jobs and events belong to a team and name the acting key

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

DEFAULT_TEAM_ID = "team_default"


def upgrade() -> None:
    op.create_table('teams',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('max_queued', sa.Integer(), nullable=True),
    sa.Column('max_running', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    )
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('role', sa.String(length=20), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=40), nullable=True),
    sa.Column('last_used_at', sa.DateTime(), nullable=True),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_api_keys_team_id', 'api_keys', ['team_id'])
    op.create_table('credentials',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('team_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('secret', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=40), nullable=True),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('team_id', 'name', name='uq_credentials_team_name'),
    )
    op.create_index('ix_credentials_team_id', 'credentials', ['team_id'])

    # Jobs made before teams existed belong to the default team (the local admin's).
    op.execute(sa.text("INSERT INTO teams (id, name, created_at) VALUES (:id, 'default', CURRENT_TIMESTAMP)").bindparams(id=DEFAULT_TEAM_ID))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('team_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('created_by', sa.String(length=40), nullable=True))
    op.execute(sa.text("UPDATE jobs SET team_id = :id").bindparams(id=DEFAULT_TEAM_ID))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('team_id', existing_type=sa.String(length=40), nullable=False)
        batch_op.create_foreign_key('fk_jobs_team_id', 'teams', ['team_id'], ['id'])
        batch_op.create_index('ix_jobs_team_id', ['team_id'], unique=False)
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('actor', sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.drop_column('actor')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_team_id')
        batch_op.drop_constraint('fk_jobs_team_id', type_='foreignkey')
        batch_op.drop_column('created_by')
        batch_op.drop_column('team_id')
    op.drop_index('ix_credentials_team_id', table_name='credentials')
    op.drop_table('credentials')
    op.drop_index('ix_api_keys_team_id', table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_table('teams')
