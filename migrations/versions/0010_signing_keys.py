"""signing keys in the database (AUTH_KEY_STORE=database)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 00:00:00

Expand-only: one new table, which code at 0009 never reads (it keeps its keys in files).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
compatible_with: str = '0009'


def upgrade() -> None:
    op.create_table('signing_keys',
    sa.Column('kid', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('alg', sa.String(length=16), nullable=False),
    sa.Column('public_jwk', sa.Text(), nullable=False),
    sa.Column('private_key', sa.LargeBinary(), nullable=False),
    sa.Column('encryption_key_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('activated_at', sa.BigInteger(), nullable=True),
    sa.Column('retired_at', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('kid')
    )
    op.create_index(op.f('ix_signing_keys_state'), 'signing_keys', ['state'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_signing_keys_state'), table_name='signing_keys')
    op.drop_table('signing_keys')
