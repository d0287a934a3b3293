"""dpop binding: sender-constrained refresh tokens of public clients, DPoP-bound clients

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 08:30:00

Expand-only: two nullable columns, which code at 0007 never reads. (Code at 0007 would
refresh a bound family without a proof; no such family exists until code at 0008 runs.)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
compatible_with: str = '0007'


def upgrade() -> None:
    op.add_column('refresh_families', sa.Column('dpop_jkt', sa.String(length=64), nullable=True))
    op.add_column('clients', sa.Column('dpop_bound', sa.Boolean(), nullable=True))


def downgrade() -> None:
    op.drop_column('clients', 'dpop_bound')
    op.drop_column('refresh_families', 'dpop_jkt')
