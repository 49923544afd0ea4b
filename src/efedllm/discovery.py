"""Server records in the hivemind DHT: signed, versioned, one key per block.

Each server stores its :class:`ServerInfo` under ``{model}.block.{i}`` for every block it hosts,
with a subkey that embeds its RSA public key, so hivemind's ``RSASignatureValidator`` signs the
record and every node rejects a record for that subkey not signed by the same key: no peer can
forge or overwrite another's record. Reading validates every record strictly and drops the rest.
"""

from __future__ import annotations

import logging
import time

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from efedllm.records import RecordError, ServerInfo

logger = logging.getLogger(__name__)
OWNER_MARKER = b"[owner:"


def block_key(model: str, block: int) -> str:
    return f"{model}.block.{block}"


def server_subkey(peer_id: str, validator: RSASignatureValidator) -> bytes:
    return peer_id.encode() + validator.local_public_key


def announce(dht: DHT, validator: RSASignatureValidator, info: ServerInfo, ttl: float) -> int:
    """Store ``info`` under every block it hosts; return how many block keys no DHT node accepted."""
    expiration = get_dht_time() + ttl
    subkey = server_subkey(info.peer_id, validator)
    futures = [
        dht.store(block_key(info.model, block), info.to_wire(), expiration, subkey=subkey, return_future=True)
        for block in range(info.span.start, info.span.end)
    ]
    return sum(1 for future in futures if not future.result(timeout=30))


def _parse_entry(subkey, value) -> ServerInfo:
    if not isinstance(subkey, bytes) or OWNER_MARKER not in subkey:
        raise RecordError("server record subkey is not signed")
    info = ServerInfo.from_wire(value)
    if subkey.split(OWNER_MARKER, 1)[0].decode(errors="replace") != info.peer_id:
        raise RecordError(f"server record for {info.peer_id} is stored under another peer's subkey")
    return info


def fetch_servers(dht: DHT, model: str, num_blocks: int, timeout: float = 10.0) -> dict[str, ServerInfo]:
    """Every valid, unexpired server record for ``model``: peer id -> its newest record."""
    futures = [dht.get(block_key(model, block), latest=True, return_future=True) for block in range(num_blocks)]
    servers: dict[str, ServerInfo] = {}
    deadline = time.monotonic() + timeout
    for future in futures:
        try:
            found = future.result(timeout=max(0.1, deadline - time.monotonic()))
        except Exception as error:
            logger.debug("DHT lookup failed: %s", error)
            continue
        if found is None or not isinstance(found.value, dict):
            continue
        for subkey, entry in found.value.items():
            try:
                info = _parse_entry(subkey, entry.value)
            except (RecordError, TypeError, ValueError) as error:
                logger.warning("ignoring malformed server record: %s", error)
                continue
            if info.model == model:
                servers[info.peer_id] = info
    return servers
