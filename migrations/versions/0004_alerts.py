"""Alerts (issue 7): rules, alert group state, seen edges, the webhook outbox and the delivery log.

Revision ID: 0004_alerts
Revises: 0003_reliability
Create Date: 2026-11-27

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0004_alerts'
down_revision: Union[str, Sequence[str], None] = '0003_reliability'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('alert_rules',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('created_ns', sa.BigInteger(), nullable=False),
    sa.Column('updated_ns', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('alert_groups',
    sa.Column('rule', sa.String(length=128), nullable=False),
    sa.Column('group_key', sa.String(length=1024), nullable=False),
    sa.Column('labels', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('since_ns', sa.BigInteger(), nullable=False),
    sa.Column('last_notified_ns', sa.BigInteger(), nullable=False),
    sa.Column('episode', sa.Integer(), nullable=False),
    sa.Column('repeat', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('updated_ns', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('rule', 'group_key')
    )
    op.create_table('alert_edges',
    sa.Column('rule', sa.String(length=128), nullable=False),
    sa.Column('edge', sa.String(length=1024), nullable=False),
    sa.Column('first_seen_ns', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('rule', 'edge')
    )
    op.create_table('alert_outbox',
    sa.Column('id', _BigId, autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('rule', sa.String(length=128), nullable=False),
    sa.Column('group_key', sa.String(length=1024), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('webhook', sa.Text(), nullable=False),
    sa.Column('created_ns', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_ns', sa.BigInteger(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('done_ns', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key')
    )
    op.create_index('ix_alert_outbox_status_next', 'alert_outbox', ['status', 'next_attempt_ns'])
    op.create_table('alert_deliveries',
    sa.Column('id', _BigId, autoincrement=True, nullable=False),
    sa.Column('outbox_id', sa.BigInteger(), nullable=False),
    sa.Column('rule', sa.String(length=128), nullable=False),
    sa.Column('group_key', sa.String(length=1024), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('time_ns', sa.BigInteger(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('ok', sa.Boolean(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('duration_ms', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_alert_deliveries_time', 'alert_deliveries', ['time_ns'])
    op.create_index('ix_alert_deliveries_rule_time', 'alert_deliveries', ['rule', 'time_ns'])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_alert_deliveries_rule_time', table_name='alert_deliveries')
    op.drop_index('ix_alert_deliveries_time', table_name='alert_deliveries')
    op.drop_table('alert_deliveries')
    op.drop_index('ix_alert_outbox_status_next', table_name='alert_outbox')
    op.drop_table('alert_outbox')
    op.drop_table('alert_edges')
    op.drop_table('alert_groups')
    op.drop_table('alert_rules')
