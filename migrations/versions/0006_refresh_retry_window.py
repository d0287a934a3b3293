"""refresh retry window: a client's own window for idempotent refresh retries

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 06:00:00

Expand-only: one nullable column (null = ``AUTH_REFRESH_RETRY_WINDOW``), which code at 0005
never reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
compatible_with: str = '0005'


def upgrade() -> None:
    op.add_column('clients', sa.Column('refresh_retry_window', sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column('clients', 'refresh_retry_window')
