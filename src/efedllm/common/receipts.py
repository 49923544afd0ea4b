"""Step receipts: a server's signed commitment to what it received and what it answered, step by step.

With receipts requested (``StepRequest.receipts``), every hop of a chain signs, beside its output,
a :class:`StepReceipt` naming the session, the step's position and shape and the digests of the
exact bytes of its input and of its output. A receipt also carries ``history``: a running digest
over every (position, input digest) of the session on that server, so a submitted session can be
replayed only complete and in order (a client that left a step out, to make an honest server's
next answer look wrong, breaks the chain and proves nothing).

The signing key is an Ed25519 *receipt key* (a signature costs ~45 µs here, an RSA identity
signature ~1 ms, too much per step); a :class:`ReceiptCertificate`, signed once at start with the
server's identity key (:mod:`efedllm.dht.identity`), binds it to the server's peer id and
announced dtype. A signed receipt whose output does not follow from its input is proof of a lie:
the server cannot deny it and nobody else can make one (:mod:`efedllm.verifier.audit`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Annotated, Iterable

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from efedllm.common.errors import RecordError
from efedllm.common.records import Count, Identifier, Key, NonNegative, PeerId, Positive, Text, WireRecord, require
from efedllm.common.spans import Span

DIGEST_BYTES = 16
SIGNATURE_BYTES = 64
RECEIPT_KEY_BYTES = 32
MAX_CERTIFICATE_SIGNATURE = 1024
Short = Annotated[str, Text(32)]


def tensor_digest(tensors: Iterable) -> bytes:
    """Digest of serialised hivemind tensors exactly as sent: dtype, shape and bytes of each."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for tensor in tensors:
        digest.update(tensor.dtype.encode())
        digest.update(msgpack.packb(list(tensor.size)))
        digest.update(tensor.buffer)
    return digest.digest()


def session_origin(session_id: str) -> bytes:
    """The ``history`` digest of a session before its first step."""
    return hashlib.blake2b(b"efedllm-session:" + session_id.encode(), digest_size=DIGEST_BYTES).digest()


def extend_history(history: bytes, position: int, input_digest: bytes) -> bytes:
    """The session's history digest after a step at ``position`` with input ``input_digest``."""
    return hashlib.blake2b(history + position.to_bytes(8, "big") + input_digest, digest_size=DIGEST_BYTES).digest()


def _signed_bytes(record: WireRecord, domain: bytes) -> bytes:
    """What a signature covers: every field but ``signature``, canonically packed, after a domain tag (so a
    receipt's signature can never pass for a certificate's)."""
    fields = record.to_wire()
    fields.pop("signature")
    return domain + msgpack.packb(sorted(fields.items()), use_bin_type=True)


def _check_bytes(name: str, value: bytes, size: int) -> None:
    require(isinstance(value, bytes) and len(value) == size, f"{name} must be {size} bytes")


class _ReceiptKeySigned:
    """What a record signed by a receipt key has: ``_digests`` (its digest fields, each ``DIGEST_BYTES``), a
    ``signature`` over every other field after the tag ``_domain``, checked by ``verify``."""

    _digests: tuple[str, ...] = ()
    _domain = b""

    def check(self) -> None:
        for name in self._digests:
            _check_bytes(f"{self.KIND}.{name}", getattr(self, name), DIGEST_BYTES)
        _check_bytes(f"{self.KIND}.signature", self.signature, SIGNATURE_BYTES)

    def signed_bytes(self) -> bytes:
        return _signed_bytes(self, self._domain)

    def verify(self, receipt_key: bytes) -> bool:
        return _verify(receipt_key, self.signature, self.signed_bytes())


@dataclass(frozen=True)
class StepReceipt(_ReceiptKeySigned, WireRecord, kind="step receipt"):
    """One hop's signed account of one step (see the module docstring); ``signature`` covers every other field."""

    peer_id: PeerId
    session_id: Identifier
    span: Span
    position: Count
    rows: Positive
    tokens: Positive
    wire_format: Short
    input_digest: bytes
    output_digest: bytes
    history: bytes
    signature: bytes = b"\0" * SIGNATURE_BYTES

    _digests = ("input_digest", "output_digest", "history")
    _domain = b"efedllm-receipt:"


@dataclass(frozen=True)
class TrainReceipt(_ReceiptKeySigned, WireRecord, kind="train receipt"):
    """A server's signed account of one training request (:mod:`efedllm.server.training`): ``request_digest``
    covers the request's metadata bytes and tensors exactly as received (:func:`train_digest`), ``answer_digest``
    the tensors it answered. A genuine receipt whose answer does not follow from its request is proof of a lie."""

    peer_id: PeerId
    span: Span
    backward: bool
    rows: Positive
    tokens: Positive
    request_digest: bytes
    answer_digest: bytes
    signature: bytes = b"\0" * SIGNATURE_BYTES

    _digests = ("request_digest", "answer_digest")
    _domain = b"efedllm-train-receipt:"


def train_digest(metadata: bytes, tensors: Iterable) -> bytes:
    """Digest of a training request as sent: its packed metadata bytes, then its serialised tensors."""
    return hashlib.blake2b(metadata + tensor_digest(tensors), digest_size=DIGEST_BYTES).digest()


def _verify(receipt_key: bytes, signature: bytes, signed: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(receipt_key).verify(signature, signed)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class ReceiptCertificate(WireRecord, kind="receipt certificate"):
    """``peer_id``'s identity key (``owner_key``) vouches that ``receipt_key`` signs its receipts, computed in ``dtype``."""

    peer_id: PeerId
    owner_key: Key
    receipt_key: bytes
    dtype: Short
    issued_at: NonNegative
    signature: bytes = b""

    def check(self) -> None:
        _check_bytes("receipt certificate.receipt_key", self.receipt_key, RECEIPT_KEY_BYTES)
        require(isinstance(self.signature, bytes) and len(self.signature) <= MAX_CERTIFICATE_SIGNATURE,
                f"receipt certificate.signature must be at most {MAX_CERTIFICATE_SIGNATURE} bytes")

    def signed_bytes(self) -> bytes:
        return _signed_bytes(self, b"efedllm-receipt-key:")


class ReceiptSigner:
    """A server's receipt key (new each start) and the receipts it signs."""

    def __init__(self) -> None:
        self._key = ed25519.Ed25519PrivateKey.generate()

    @property
    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, receipt: "StepReceipt | TrainReceipt"):
        """``receipt`` with its signature filled in."""
        return dataclasses.replace(receipt, signature=self._key.sign(receipt.signed_bytes()))


def check_chain(receipts: tuple[StepReceipt, ...], peers: tuple[str, ...], sent_digest: bytes,
                output_digests: tuple[bytes, ...]) -> None:
    """Checks one chained step's receipts against the chain and the bytes seen; RecordError says what is off.

    ``peers``: the chain's peer ids in order; ``sent_digest``: of what the first hop was sent;
    ``output_digests``: of each hop's output as delivered. Each hop's input must be the previous
    hop's output, byte for byte."""
    if len(receipts) != len(peers) or len(output_digests) != len(peers):
        raise RecordError(f"{len(receipts)} receipts and {len(output_digests)} outputs for a chain of {len(peers)} hops")
    expected_input = sent_digest
    for index, (receipt, peer, output) in enumerate(zip(receipts, peers, output_digests)):
        if receipt.peer_id != peer:
            raise RecordError(f"receipt {index} is from {receipt.peer_id}, not the chain's hop {peer}")
        if receipt.input_digest != expected_input:
            raise RecordError(f"receipt {index} ({peer}) commits to another input than the one it was sent")
        if receipt.output_digest != output:
            raise RecordError(f"receipt {index} ({peer}) commits to another output than the one delivered")
        expected_input = output

