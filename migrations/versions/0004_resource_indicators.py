"""resource indicators: the RFC 8707 resources of a sign-in and of an authorization code

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 21:30:00

Expand-only: two columns with a server default (empty: the default audience, which is what
every earlier row was issued for), so replicas still running 0003 keep working.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
compatible_with: str = '0003'

TABLES = ('refresh_families', 'authorization_codes')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(
                sa.Column('resources', sa.Text(), nullable=False, server_default='')
            )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column('resources')
