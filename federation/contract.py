"""What this instance promises its peers (docs/architecture.md "The federation protocol"): the contract version, the capabilities
its ping and handshake advertise, the content types of a delivery and the batch cap. Pure: no Django."""

from ingest.cloudevent import BATCH_CONTENT_TYPE
from ingest.cloudevent import STRUCTURED_CONTENT_TYPE as SINGLE_CONTENT_TYPE

CONTRACT_VERSION = 1
BATCH_CAP = 500  # events per batch POST: advertised as batch_max, and the most this instance sends in one

__all__ = ["BATCH_CAP", "BATCH_CONTENT_TYPE", "CONTRACT_VERSION", "SINGLE_CONTENT_TYPE", "capabilities"]


def capabilities() -> dict:
    return {"contract_version": CONTRACT_VERSION, "batch_max": BATCH_CAP}
