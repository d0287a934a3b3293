"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: str | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}
#: The oldest code revision that runs correctly on the schema this migration produces
#: (migrations/env.py records it in schema_compatibility, where older releases read it). As
#: generated, this revision itself: a contract migration, the previous release refuses to run
#: on it. If the migration is expand-only (new tables, nullable columns, columns with a server
#: default; nothing older code reads or writes changes), put the revision before it here,
#: ${repr(down_revision)}, so that the previous release keeps running during the rollout and
#: after a rollback.
compatible_with: str = ${repr(up_revision)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
