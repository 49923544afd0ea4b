"""Server records in the hivemind DHT: signed, versioned, one key per block.

Each server stores its :class:`ServerInfo` under ``{model}.block.{i}`` for every block it hosts,
with a subkey that embeds its RSA public key, so hivemind's ``RSASignatureValidator`` signs the
record and every node rejects a record for that subkey not signed by the same key: no peer can
forge or overwrite another's record. Reading validates every record strictly and drops the rest.
"""

from __future__ import annotations

import logging

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


class _LatestValues:
    """Runs inside the DHT process (``DHT.run_coroutine`` pickles it): one traversal for all ``keys``."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    async def __call__(self, dht: DHT, node) -> dict:
        return await node.get_many(self.keys, sufficient_expiration_time=float("inf"))  # the latest of each


def get_latest_many(dht: DHT, keys: list[str], timeout: float = 10.0) -> dict:
    """key -> its latest ``ValueWithExpiration`` (None when absent); {} when the lookup fails.

    One batched search instead of one per key: for the 30 block keys of a 3-server swarm on
    127.0.0.1 it took 42-60 ms against 111-154 ms for 30 parallel ``DHT.get`` calls
    (median of 5 reads each)."""
    try:
        return dht.run_coroutine(_LatestValues(list(keys)), return_future=True).result(timeout=timeout)
    except Exception as error:
        logger.debug("DHT lookup of %d keys failed: %r", len(keys), error)
        return {}


def fetch_servers(dht: DHT, model: str, num_blocks: int, timeout: float = 10.0) -> dict[str, ServerInfo]:
    """Every valid, unexpired server record for ``model``: peer id -> its newest record."""
    found_by_key = get_latest_many(dht, [block_key(model, block) for block in range(num_blocks)], timeout)
    servers: dict[str, ServerInfo] = {}
    for found in found_by_key.values():
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
