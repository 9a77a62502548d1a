"""initial schema: instances and intake_events

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 14:32:45.560000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('instances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('accession_number', sa.String(length=64), nullable=True),
    sa.Column('modality', sa.String(length=16), nullable=True),
    sa.Column('transfer_syntax', sa.String(length=64), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('receive_count', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires', sa.DateTime(timezone=True), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('predicted_class', sa.String(length=32), nullable=True),
    sa.Column('probabilities', sa.JSON(), nullable=True),
    sa.Column('top_probability', sa.Float(), nullable=True),
    sa.Column('priority', sa.String(length=16), nullable=True),
    sa.Column('triage_reason', sa.Text(), nullable=True),
    sa.Column('model_name', sa.String(length=64), nullable=True),
    sa.Column('model_version', sa.String(length=64), nullable=True),
    sa.Column('model_precision', sa.String(length=8), nullable=True),
    sa.Column('timings', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_accession_number'), ['accession_number'], unique=False)
        batch_op.create_index('ix_instances_received_at', ['received_at'], unique=False)
        batch_op.create_index('ix_instances_state_id', ['state', 'id'], unique=False)
        batch_op.create_index('ix_instances_state_lease', ['state', 'lease_expires'], unique=False)
        batch_op.create_index(batch_op.f('ix_instances_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('intake_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('status', sa.Integer(), nullable=True),
    sa.Column('calling_ae', sa.String(length=16), nullable=True),
    sa.Column('peer', sa.String(length=64), nullable=True),
    sa.Column('sop_instance_uid', sa.String(length=128), nullable=True),
    sa.Column('sop_class_uid', sa.String(length=128), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('intake_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_intake_events_at'), ['at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('intake_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_intake_events_at'))

    op.drop_table('intake_events')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_study_instance_uid'))
        batch_op.drop_index('ix_instances_state_lease')
        batch_op.drop_index('ix_instances_state_id')
        batch_op.drop_index('ix_instances_received_at')
        batch_op.drop_index(batch_op.f('ix_instances_accession_number'))

    op.drop_table('instances')
