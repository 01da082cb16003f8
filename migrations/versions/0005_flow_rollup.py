"""Per-minute flow rollup (issue 10): the service map and top talkers without reading the flows.

Backfills the rollup from the stored flows, oldest first, in chunks (decoding each flow's JSON: the map's
node grouping needs workloads, labels and address classes that are not columns). On a 10-million-flow
SQLite database this takes minutes; progress is logged every million flows.

Revision ID: 0005_flow_rollup
Revises: 0004_alerts
Create Date: 2026-11-27

"""
import logging
import time
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0005_flow_rollup'
down_revision: Union[str, Sequence[str], None] = '0004_alerts'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

log = logging.getLogger("flowscope.migrations")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('flow_rollup',
    sa.Column('bucket_ns', sa.BigInteger(), nullable=False),
    sa.Column('src', sa.String(length=512), nullable=False),
    sa.Column('src_pod', sa.String(length=512), nullable=False),
    sa.Column('dst', sa.String(length=512), nullable=False),
    sa.Column('dst_pod', sa.String(length=512), nullable=False),
    sa.Column('port', sa.String(length=24), nullable=False),
    sa.Column('verdict', sa.String(length=24), nullable=False),
    sa.Column('drop_reason', sa.String(length=64), nullable=False),
    sa.Column('l7', sa.String(length=8), nullable=False),
    sa.Column('latency', sa.Integer(), nullable=False),
    sa.Column('policy', sa.String(length=1024), nullable=False),
    sa.Column('src_ns', sa.String(length=253), nullable=False),
    sa.Column('dst_ns', sa.String(length=253), nullable=False),
    sa.Column('flows', sa.BigInteger(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('responses', sa.BigInteger(), nullable=False),
    sa.Column('errors', sa.BigInteger(), nullable=False),
    sa.Column('first_ns', sa.BigInteger(), nullable=False),
    sa.Column('last_ns', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('bucket_ns', 'src', 'src_pod', 'dst', 'dst_pod', 'port', 'verdict', 'drop_reason',
                            'l7', 'latency', 'policy'),
    sqlite_with_rowid=False,
    )
    op.create_table('flow_rollup_endpoints',
    sa.Column('key', sa.String(length=520), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('namespace', sa.String(length=253), nullable=False),
    sa.Column('name', sa.String(length=512), nullable=False),
    sa.Column('workload', sa.String(length=512), nullable=False),
    sa.Column('identity', sa.BigInteger(), nullable=False),
    sa.Column('labels', sa.Text(), nullable=False),
    sa.Column('from_args', sa.Text(), nullable=False),
    sa.Column('to_args', sa.Text(), nullable=False),
    sa.Column('addrs', sa.Text(), nullable=False),
    sa.Column('nodes', sa.Text(), nullable=False),
    sa.Column('last_ns', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_index('ix_flow_rollup_endpoints_last_ns', 'flow_rollup_endpoints', ['last_ns'])

    from api.rollup import backfill

    started = time.monotonic()
    n = backfill(op.get_bind(), log=lambda n: log.warning("flow rollup backfill: %d flows read (%.0f s)", n,
                                                          time.monotonic() - started))
    if n:
        log.warning("flow rollup backfilled from %d stored flows in %.1f s", n, time.monotonic() - started)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_flow_rollup_endpoints_last_ns', table_name='flow_rollup_endpoints')
    op.drop_table('flow_rollup_endpoints')
    op.drop_table('flow_rollup')
