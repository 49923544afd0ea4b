"""Server records in the hivemind DHT: one signed, versioned :class:`ServerInfo` per block a server hosts.

A server stores its record under ``{model}.block.{i}`` for every block it hosts, subkey its peer id
followed by its signing key (:mod:`efedllm.dht.signed`), so no other key can overwrite that entry.
A reader keeps an entry only if its subkey's peer id and key are the ones the record names; of
several records for one peer it keeps the newest (the latest expiration). What this does not
establish is that the peer id belongs to the signer: a peer can store records under its own key
that name another peer's id.
"""

from __future__ import annotations

from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator

from efedllm.common.errors import RecordError
from efedllm.dht.records import ServerInfo
from efedllm.dht.signed import SignedEntry, get_latest_many, read_signed, store_signed


def block_key(model: str, block: int) -> str:
    return f"{model}.block.{block}"


def announce(dht: DHT, validator: RSASignatureValidator, info: ServerInfo, ttl: float) -> int:
    """Store ``info`` under every block it hosts; return how many block keys no DHT node accepted."""
    futures = [store_signed(dht, validator, block_key(info.model, block), info.to_wire(), ttl, info.peer_id.encode())
               for block in range(info.span.start, info.span.end)]
    return sum(1 for future in futures if not future.result(timeout=30))


def parse_server_entry(entry: SignedEntry) -> tuple[ServerInfo, float]:
    """(the record, its expiration time); RecordError when it is stored under another peer's id or key."""
    info = ServerInfo.from_wire(entry.value)
    if entry.prefix.decode(errors="replace") != info.peer_id:
        raise RecordError(f"server record for {info.peer_id} is stored under another peer's subkey")
    if entry.signer != info.public_key:
        raise RecordError(f"server record for {info.peer_id} names a key other than the one that signed it")
    return info, entry.expiration_time


def newest_by_peer(records: list[tuple[ServerInfo, float]]) -> dict[str, ServerInfo]:
    """peer id -> the record with the latest expiration time among ``(record, expiration)`` pairs (pure)."""
    newest: dict[str, tuple[ServerInfo, float]] = {}
    for info, expiration in records:
        if info.peer_id not in newest or expiration > newest[info.peer_id][1]:
            newest[info.peer_id] = (info, expiration)
    return {peer: info for peer, (info, _) in newest.items()}


def fetch_servers(dht: DHT, model: str, num_blocks: int, timeout: float = 10.0) -> dict[str, ServerInfo]:
    """Every valid, unexpired server record for ``model``: peer id -> its newest record."""
    found_by_key = get_latest_many(dht, [block_key(model, block) for block in range(num_blocks)], timeout)
    records = [record for found in found_by_key.values() for record in read_signed(found, parse_server_entry, "server record")]
    return newest_by_peer([(info, expiration) for info, expiration in records if info.model == model])
