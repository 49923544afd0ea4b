"""Server records in the hivemind DHT: one signed, versioned :class:`ServerInfo` per block a server hosts.

A server stores its record under ``{model}.block.{i}`` for every block it hosts, subkey its peer id
followed by its signing key (:mod:`efedllm.dht.signed`), so no other key can overwrite that entry.
A reader keeps an entry only if its subkey's peer id and key are the ones the record names and
the peer id is the one derived from the signing key (:func:`~efedllm.dht.identity.peer_id_of_owner`):
only peer P's own identity key can sign a record about P. A record dated beyond the clock skew is
dropped; of several records for one peer the reader keeps the newest by ``issued_at``, so an older
record (a replay) never replaces a newer one.
"""

from __future__ import annotations

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator

from efedllm.common.errors import RecordError
from efedllm.dht.identity import peer_id_of_owner
from efedllm.dht.records import ServerInfo
from efedllm.dht.signed import SignedEntry, check_dated, get_latest_many, read_signed, store_signed


def block_key(model: str, block: int) -> str:
    return f"{model}.block.{block}"


def announce(dht: DHT, validator: RSASignatureValidator, info: ServerInfo, ttl: float) -> int:
    """Store ``info`` under every block it hosts; return how many block keys no DHT node accepted."""
    futures = [store_signed(dht, validator, block_key(info.model, block), info.to_wire(), ttl, info.peer_id.encode())
               for block in range(info.span.start, info.span.end)]
    return sum(1 for future in futures if not future.result(timeout=30))


def parse_server_entry(entry: SignedEntry, now: float | None = None) -> ServerInfo:
    """The record; RecordError when it is stored under another peer's id, signed by a key that is not
    its peer's identity, or dated in the future."""
    info = ServerInfo.from_wire(entry.value)
    if entry.prefix.decode(errors="replace") != info.peer_id:
        raise RecordError(f"server record for {info.peer_id} is stored under another peer's subkey")
    if entry.signer != info.public_key:
        raise RecordError(f"server record for {info.peer_id} names a key other than the one that signed it")
    if peer_id_of_owner(entry.signer) != info.peer_id:
        raise RecordError(f"server record for {info.peer_id} is signed by another peer's key")
    check_dated(info.issued_at, f"server record for {info.peer_id}", now)
    return info


def newest_by_peer(records: list[ServerInfo]) -> dict[str, ServerInfo]:
    """peer id -> its record with the latest ``issued_at`` (pure)."""
    newest: dict[str, ServerInfo] = {}
    for info in records:
        if info.peer_id not in newest or info.issued_at > newest[info.peer_id].issued_at:
            newest[info.peer_id] = info
    return newest


def fetch_servers(dht: DHT, model: str, num_blocks: int, timeout: float = 10.0) -> dict[str, ServerInfo]:
    """Every valid, unexpired server record for ``model``: peer id -> its newest record."""
    found_by_key = get_latest_many(dht, [block_key(model, block) for block in range(num_blocks)], timeout)
    records = [record for found in found_by_key.values() for record in read_signed(found, parse_server_entry, "server record")]
    return newest_by_peer([info for info in records if info.model == model])
