"""Peer ids as users type them (``--weights-from PEER``, the ``/p2p/`` part of a multiaddr): checked strictly."""

from __future__ import annotations

import multihash
from hivemind.p2p import PeerID


def parse_peer_id(text: str) -> PeerID:
    """A libp2p peer id in base58 (``Qm...`` or ``12D3Koo...``); ValueError naming the text otherwise.

    hivemind's own ``PeerID.from_base58`` accepts any base58 string; a real id is a multihash
    (sha2-256 of the public key, or the key itself inline)."""
    try:
        peer = PeerID.from_base58(text)
        multihash.decode(peer.to_bytes())
    except Exception:
        raise ValueError(f"{text!r} is not a peer id (base58, e.g. Qm... or 12D3Koo...)") from None
    return peer
