"""Reliability and security (issue 8): applied ingest batch ids (idempotent ingest) and API tokens.

Revision ID: 0003_reliability
Revises: 0002
Create Date: 2026-11-27

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0003_reliability'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('ingest_batches',
    sa.Column('batch_id', sa.String(length=400), nullable=False),
    sa.Column('node_name', sa.String(length=253), nullable=False),
    sa.Column('first_id', sa.BigInteger(), nullable=False),
    sa.Column('flows', sa.Integer(), nullable=False),
    sa.Column('received_ns', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('batch_id')
    )
    op.create_index('ix_ingest_batches_received_ns', 'ingest_batches', ['received_ns'])
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('rate_limit', sa.Float(), nullable=True),
    sa.Column('created_ns', sa.BigInteger(), nullable=False),
    sa.Column('last_used_ns', sa.BigInteger(), nullable=True),
    sa.Column('revoked_ns', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('api_tokens')
    op.drop_index('ix_ingest_batches_received_ns', table_name='ingest_batches')
    op.drop_table('ingest_batches')
