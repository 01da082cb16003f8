"""Network policies (issue 4): the current set and its revision history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('policies',
    sa.Column('namespace', sa.String(length=63), nullable=False),
    sa.Column('name', sa.String(length=253), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('revision', sa.BigInteger(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_ns', sa.BigInteger(), nullable=False),
    sa.Column('updated_ns', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('namespace', 'name')
    )
    op.create_table('policy_revisions',
    sa.Column('revision', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('namespace', sa.String(length=63), nullable=False),
    sa.Column('name', sa.String(length=253), nullable=False),
    sa.Column('action', sa.String(length=8), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('body', sa.Text(), nullable=True),
    sa.Column('time_ns', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('revision')
    )
    op.create_index('ix_policy_revisions_ns_name', 'policy_revisions', ['namespace', 'name', 'revision'])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_policy_revisions_ns_name', table_name='policy_revisions')
    op.drop_table('policy_revisions')
    op.drop_table('policies')
