"""schema compatibility: which code runs on each applied revision's schema

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 10:00:00

Expand-only: one new table, which code at 0004 never reads. migrations/env.py fills it after
every step from each migration's ``compatible_with`` (this one's rows included), so a release
older than the schema can tell whether it may run on it. Its two columns must never change:
every later release reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
compatible_with: str = '0004'


def upgrade() -> None:
    op.create_table('schema_compatibility',
    sa.Column('revision', sa.String(length=32), nullable=False),
    sa.Column('compatible_with', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('revision')
    )


def downgrade() -> None:
    op.drop_table('schema_compatibility')
