"""Span weights from server to server (paper §4.2): ``efedllm serve ... --weights-from PEER``.

A server that already hosts blocks can hand them to a joining server, which then needs no copy
of the weights of its own (only the model's config). When the sender serves compressed blocks
they travel as they are stored (eq. 9's factors or the interpolative form's rows and mix), so a transfer at ratio C sends about C × the
dense bytes; the header says both numbers, and the receiver logs them.

Call order. Sender: ``rpc_span_weights`` (in the servicer) calls :func:`pack_span_weights` and
streams a :class:`Reply`, a :class:`WeightsHeader`, then the payload in chunks of :data:`CHUNK_BYTES`. Receiver:
:func:`fetch_span_weights` (validates the header, sizes and sender's compression against its
own), then :func:`span_from_payload`.

Weights from a peer are untrusted like its outputs: a verifier checks the receiver's outputs
against reference weights as it checks everyone's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from efedllm.common.dtypes import dtype_name, parse_dtype
from efedllm.common.errors import RecordError
from efedllm.common.spans import Span
from efedllm.compression.transfer import (
    TransferError,
    dense_payload_bytes,
    load_packed_layers,
    pack_layers,
    unpack_layers,
)
from efedllm.models.quantization import is_quantized
from efedllm.models.span import empty_span
from efedllm.protocol import codec
from efedllm.protocol.messages import Reply, WeightsHeader, WeightsRequest
from efedllm.protocol.service import span_service_stub

CHUNK_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 16 << 30
FETCH_TIMEOUT = 600.0


class WeightsTransferError(TransferError):
    """A weights transfer failed: the peer refused, sent malformed data, or compresses differently."""


def pack_span_weights(span_model, blocks: Span, compression: dict | None) -> tuple[WeightsHeader, bytes]:
    """Header and payload of ``blocks`` (inside ``span_model``'s span), factors where compressed."""
    if is_quantized(span_model):  # int8 weights would reach the receiver already rounded: it reads its own file
        raise RecordError("this server holds int8-quantised weights and does not hand them on; fetch from a float server")
    if not span_model.span.contains(blocks):
        raise RecordError(f"blocks {blocks} are not inside this server's span {span_model.span}")
    first, last = blocks.start - span_model.span.start, blocks.end - span_model.span.start
    layers = span_model.layers[first:last]
    payload = pack_layers(layers, blocks.start)
    header = WeightsHeader(blocks, dtype_name(span_model.dtype), len(payload), dense_payload_bytes(layers, blocks.start), compression)
    return header, payload


def weights_messages(header: WeightsHeader, payload: bytes):
    """The stream a sender answers with: a reply, the header, then raw payload chunks (carried in ``metadata``)."""
    yield codec.ok_reply()
    yield codec.response(header)
    for offset in range(0, len(payload), CHUNK_BYTES):
        yield runtime_pb2.ExpertResponse(metadata=payload[offset : offset + CHUNK_BYTES])


def check_compression(header: WeightsHeader, wanted: dict | None) -> bool:
    """Whether the receiver must still compress what arrives; raises when the two settings conflict.

    Dense weights can be compressed on arrival; compressed weights cannot be uncompressed, and
    weights compressed with other settings would make this server compute something else.
    """
    if header.compression is None:
        return wanted is not None
    if header.compression != wanted:
        raise WeightsTransferError(
            f"the peer serves blocks {header.span} compressed with {header.compression}, this server asks for "
            f"{wanted or 'dense weights'}: start it with the same --svd-* options or fetch from a dense peer"
        )
    return False


async def fetch_span_weights(p2p: P2P, peer_id: str, blocks: Span) -> tuple[WeightsHeader, bytes]:
    """Header and payload of ``blocks`` from ``peer_id``; raises :class:`WeightsTransferError`."""
    try:
        return await asyncio.wait_for(_fetch(p2p, peer_id, blocks), FETCH_TIMEOUT)
    except WeightsTransferError:
        raise
    except Exception as error:
        raise WeightsTransferError(f"could not fetch blocks {blocks} from {peer_id}: {error!r}") from None


async def _fetch(p2p: P2P, peer_id: str, blocks: Span) -> tuple[WeightsHeader, bytes]:
    stub = span_service_stub(p2p, peer_id)
    stream: AsyncIterator[runtime_pb2.ExpertResponse] = await stub.rpc_span_weights(codec.request(WeightsRequest(blocks)))
    reply = codec.read_message(Reply, await anext(stream))
    if not reply.ok:
        raise WeightsTransferError(f"peer {peer_id} refused blocks {blocks}: {reply.error}")
    header = codec.read_message(WeightsHeader, await anext(stream))
    if header.span != blocks or header.payload_bytes > MAX_PAYLOAD_BYTES:
        raise WeightsTransferError(f"peer {peer_id} announced blocks {header.span} of {header.payload_bytes} bytes for {blocks}")
    chunks, received = [], 0
    async for message in stream:
        received += len(message.metadata)
        if received > header.payload_bytes:
            raise WeightsTransferError(f"peer {peer_id} sent more than the {header.payload_bytes} bytes it announced")
        chunks.append(message.metadata)
    if received != header.payload_bytes:
        raise WeightsTransferError(f"peer {peer_id} sent {received} of the {header.payload_bytes} bytes it announced")
    return header, b"".join(chunks)


def span_from_payload(model: str, blocks: Span, payload: bytes, dtype: str):
    """A ``SpanModel`` of ``blocks`` built from a received payload, in ``dtype``."""
    packed = unpack_layers(payload)
    if packed.start != blocks.start or packed.end != blocks.end:
        raise TransferError(f"payload holds blocks {packed.start}:{packed.end}, expected {blocks}")
    span_model = empty_span(model, blocks.start, blocks.end)
    load_packed_layers(span_model.layers, packed, assign=True)
    if any(parameter.is_meta for parameter in span_model.parameters()):
        raise TransferError("payload left some parameters unset")
    return span_model.to(parse_dtype(dtype))
