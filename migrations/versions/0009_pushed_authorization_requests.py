"""pushed authorization requests (RFC 9126) and codes bound to a DPoP key (RFC 9449 §10)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 11:30:00

Expand-only: one new table and two nullable columns, none of which code at 0008 reads. Code
at 0008 ignores ``request_uri`` (it would refuse such a request for its missing parameters),
would let a client that requires PAR send plain requests, and would exchange a code bound to a
DPoP key without a proof; no such client or code exists until code at 0009 runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
compatible_with: str = '0008'


def upgrade() -> None:
    op.add_column('clients', sa.Column('require_par', sa.Boolean(), nullable=True))
    op.add_column(
        'authorization_codes', sa.Column('dpop_jkt', sa.String(length=64), nullable=True)
    )
    op.create_table('pushed_requests',
    sa.Column('request_uri_hash', sa.String(length=64), nullable=False),
    sa.Column('client_id', sa.String(length=100), nullable=False),
    sa.Column('params', sa.Text(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.Column('browser_hash', sa.String(length=64), nullable=True),
    sa.Column('used_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['client_id'], ['clients.client_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('request_uri_hash')
    )
    op.create_index(
        op.f('ix_pushed_requests_client_id'), 'pushed_requests', ['client_id'], unique=False
    )
    op.create_index(
        op.f('ix_pushed_requests_expires_at'), 'pushed_requests', ['expires_at'], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f('ix_pushed_requests_expires_at'), table_name='pushed_requests')
    op.drop_index(op.f('ix_pushed_requests_client_id'), table_name='pushed_requests')
    op.drop_table('pushed_requests')
    op.drop_column('authorization_codes', 'dpop_jkt')
    op.drop_column('clients', 'require_par')
