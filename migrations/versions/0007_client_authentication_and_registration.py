"""client authentication and registration: key-based client authentication (RFC 7523),
dynamic registration (RFC 7591/7592), client metadata documents, per-client resources

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 07:00:00

Expand-only: nullable columns and one new table, none of which code at 0006 reads. A client
that code at 0006 cannot authenticate correctly is never left open to it: a ``private_key_jwt``
client is stored with the hash of a secret nobody knows (code at 0006 sees a confidential
client whose secret nobody has), a ``client_secret_jwt`` client with its secret's hash.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
compatible_with: str = '0006'


def upgrade() -> None:
    op.add_column('clients', sa.Column('auth_method', sa.String(length=32), nullable=True))
    op.add_column('clients', sa.Column('jwks', sa.Text(), nullable=True))
    op.add_column('clients', sa.Column('jwks_uri', sa.Text(), nullable=True))
    op.add_column('clients', sa.Column('secret_sealed', sa.Text(), nullable=True))
    op.add_column('clients', sa.Column('resources', sa.Text(), nullable=True))
    op.add_column('clients', sa.Column('origin', sa.String(length=16), nullable=True))
    op.add_column(
        'clients', sa.Column('registration_token_hash', sa.String(length=64), nullable=True)
    )
    op.create_table('registration_tokens',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('token_hash')
    )
    op.create_index(
        op.f('ix_registration_tokens_expires_at'), 'registration_tokens', ['expires_at'],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f('ix_registration_tokens_expires_at'), table_name='registration_tokens')
    op.drop_table('registration_tokens')
    for column in (
        'registration_token_hash', 'origin', 'resources', 'secret_sealed', 'jwks_uri', 'jwks',
        'auth_method',
    ):
        op.drop_column('clients', column)
