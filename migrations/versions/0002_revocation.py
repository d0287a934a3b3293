"""revocation: resource-server clients and revoked access tokens

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 11:30:00

Expand-only: a new nullable-free column with a server default and a new table, so replicas
still running revision 0001 keep working while this runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
compatible_with: str = '0001'


def upgrade() -> None:
    with op.batch_alter_table('clients') as batch_op:
        batch_op.add_column(
            sa.Column(
                'is_resource_server', sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
    op.create_table('revoked_access_tokens',
    sa.Column('jti', sa.String(length=64), nullable=False),
    sa.Column('client_id', sa.String(length=100), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.Column('revoked_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('jti')
    )
    op.create_index(
        op.f('ix_revoked_access_tokens_expires_at'),
        'revoked_access_tokens',
        ['expires_at'],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(
        op.f('ix_revoked_access_tokens_expires_at'), table_name='revoked_access_tokens'
    )
    op.drop_table('revoked_access_tokens')
    with op.batch_alter_table('clients') as batch_op:
        batch_op.drop_column('is_resource_server')
