"""Decoding ``POST /api/v1/flows`` bodies (pure: bytes in, prepared rows or a clear error out)."""

from __future__ import annotations

from typing import Annotated, Optional, Union

import msgspec

from flowscope import schema

from .store import PreparedBatch, prepare_batch


class IngestBatch(msgspec.Struct, forbid_unknown_fields=True):
    """An agent's batch: flows, the losses it counted since its previous batch, and who sent it."""

    flows: list[schema.Flow] = []
    lost_events: list[schema.LostEvent] = []
    node_name: str = ""
    agent_version: str = ""
    # The agent's id of this batch (node name/boot id/sequence): a batch id already applied is not stored
    # again (idempotent retries); '' = no id, always stored.
    batch_id: Annotated[str, msgspec.Meta(max_length=400)] = ""


_decoder = msgspec.json.Decoder(Union[IngestBatch, list[schema.Flow]])


class IngestError(ValueError):
    """Bad ingest input; ``status`` is the HTTP status to answer with (400 not JSON, 422 not a batch)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_ingest(body: bytes, *, now_ns: Optional[int] = None) -> PreparedBatch:
    """Validate a body (``{"flows": [...], "lost_events": [...], "node_name": ...}`` or a bare array of
    flows) and prepare its rows. Raises :class:`IngestError` naming the offending JSON path."""
    if not body.strip():
        raise IngestError(400, 'empty body: expected {"flows": [...]} or a JSON array of flows')
    try:
        obj = _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise IngestError(422, f"invalid flow batch: {e}") from None
    except msgspec.DecodeError as e:
        raise IngestError(400, f"invalid JSON: {e}") from None
    try:
        if isinstance(obj, list):
            return prepare_batch(obj, now_ns=now_ns)
        return prepare_batch(obj.flows, obj.lost_events, node_name=obj.node_name, agent_version=obj.agent_version,
                             now_ns=now_ns, batch_id=obj.batch_id)
    except ValueError as e:  # e.g. a well-formed but impossible time ("2026-13-45T99:00:00Z")
        raise IngestError(422, f"invalid flow batch: {e}") from None
