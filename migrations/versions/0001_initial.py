"""Initial schema: flows, lost_events, nodes.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('flows',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('time_ns', sa.BigInteger(), nullable=False),
    sa.Column('node_name', sa.String(length=253), nullable=False),
    sa.Column('verdict', sa.String(length=24), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('traffic_direction', sa.String(length=32), nullable=False),
    sa.Column('is_reply', sa.Boolean(), nullable=True),
    sa.Column('ip_version', sa.SmallInteger(), nullable=False),
    sa.Column('src_ip', sa.String(length=45), nullable=False),
    sa.Column('dst_ip', sa.String(length=45), nullable=False),
    sa.Column('src_port', sa.Integer(), nullable=True),
    sa.Column('dst_port', sa.Integer(), nullable=True),
    sa.Column('protocol', sa.String(length=8), nullable=False),
    sa.Column('l7_protocol', sa.String(length=8), nullable=False),
    sa.Column('l7_type', sa.String(length=16), nullable=False),
    sa.Column('src_namespace', sa.String(length=253), nullable=False),
    sa.Column('src_pod', sa.String(length=253), nullable=False),
    sa.Column('dst_namespace', sa.String(length=253), nullable=False),
    sa.Column('dst_pod', sa.String(length=253), nullable=False),
    sa.Column('src_identity', sa.BigInteger(), nullable=False),
    sa.Column('dst_identity', sa.BigInteger(), nullable=False),
    sa.Column('drop_reason', sa.String(length=64), nullable=False),
    sa.Column('http_code', sa.Integer(), nullable=True),
    sa.Column('flow_event', sa.String(length=16), nullable=False),
    sa.Column('uuid', sa.String(length=64), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_flows_time_ns', 'flows', ['time_ns'])
    op.create_index('ix_flows_src_ns_time', 'flows', ['src_namespace', 'time_ns'])
    op.create_index('ix_flows_dst_ns_time', 'flows', ['dst_namespace', 'time_ns'])
    op.create_index('ix_flows_verdict_time', 'flows', ['verdict', 'time_ns'])

    op.create_table('lost_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('time_ns', sa.BigInteger(), nullable=False),
    sa.Column('node_name', sa.String(length=253), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('num_lost', sa.BigInteger(), nullable=False),
    sa.Column('cpu', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_lost_events_time_ns', 'lost_events', ['time_ns'])

    op.create_table('nodes',
    sa.Column('name', sa.String(length=253), nullable=False),
    sa.Column('last_seen_ns', sa.BigInteger(), nullable=False),
    sa.Column('agent_version', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('nodes')
    op.drop_index('ix_lost_events_time_ns', table_name='lost_events')
    op.drop_table('lost_events')
    op.drop_index('ix_flows_verdict_time', table_name='flows')
    op.drop_index('ix_flows_dst_ns_time', table_name='flows')
    op.drop_index('ix_flows_src_ns_time', table_name='flows')
    op.drop_index('ix_flows_time_ns', table_name='flows')
    op.drop_table('flows')
