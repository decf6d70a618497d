"""outbox_item: a partial index of the rows the dispatcher may claim, in claim order

The claim's bitmap scan of (status, due_at) visited every index entry that sent rows left
behind until the next vacuum (each row moves pending -> sending -> sent), at every claim;
a PostgreSQL table vacuumed at 20% dead rows made that hundreds of thousands of entries.
The partial index holds pending and sending rows only, in the claim's order, and is walked
with a plain index scan that stops at the batch size and marks dead entries as it passes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

WORK = "status IN ('pending', 'sending')"  # word for word as in handler.models.OUTBOX_WORK


def upgrade() -> None:
    with op.batch_alter_table("outbox_item", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_item_work", [sa.text("urgent DESC"), "due_at", "id"],
                              unique=False, postgresql_where=sa.text(WORK),
                              sqlite_where=sa.text(WORK))
        batch_op.drop_index("ix_outbox_item_due")


def downgrade() -> None:
    with op.batch_alter_table("outbox_item", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_item_due", ["status", "due_at"], unique=False)
        batch_op.drop_index("ix_outbox_item_work")
