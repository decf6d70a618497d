"""outbox_item: index on (recipient, created_at)

Intake counts the acknowledgements a sender got in the last 24 hours for every inbound
message; without this index that count read the whole outbox table each time.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 21:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox_item", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_item_recipient", ["recipient", "created_at"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outbox_item", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_item_recipient")
