"""A peer's identity: one RSA key that is both its libp2p identity (its peer id) and its DHT signing key.

A libp2p peer id is the sha2-256 multihash of the peer's public key, so a record signed by key K
can be checked to speak for peer P: ``peer_id_of_owner(K) == P`` (:func:`peer_id_of_owner`). For
that, each node must sign its DHT records with the very key its P2P daemon runs under; hivemind's
default is a process-wide signing key unrelated to the peer id, which let any peer store records
naming another peer's id (issue 15).

Call order: ``Identity.generate()`` or ``Identity.load_or_create(path)``, then
:func:`start_dht` (the DHT runs under this identity and signs with it). A key file is the libp2p
``PrivateKey`` protobuf that hivemind's ``P2P.generate_identity`` writes, so ``--identity`` files
are interchangeable with hivemind's ``identity_path``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import base58
import multihash
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from efedllm.common.errors import EfedllmError, RecordError
from efedllm.common.receipts import ReceiptCertificate
from efedllm.dht.signed import owner_key

OWNER_PREFIX, OWNER_SUFFIX = b"[owner:", b"]"


class IdentityError(EfedllmError, ValueError):
    """An identity key file that cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class Identity:
    """A private key (``private_key``) and its libp2p protobuf encoding (``protobuf``, what p2pd reads)."""

    private_key: RSAPrivateKey
    protobuf: bytes

    @classmethod
    def generate(cls) -> "Identity":
        key = RSAPrivateKey()
        return cls(key, crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString())

    @classmethod
    def from_protobuf(cls, data: bytes) -> "Identity":
        """The identity in a libp2p ``PrivateKey`` protobuf; IdentityError unless it holds an RSA key."""
        try:
            message = crypto_pb2.PrivateKey.FromString(data)
            loaded = serialization.load_der_private_key(message.data, password=None)
        except Exception as error:
            raise IdentityError(f"not a libp2p private key: {error}") from None
        if message.key_type != crypto_pb2.KeyType.RSA or not isinstance(loaded, rsa.RSAPrivateKey):
            raise IdentityError("identity keys must be RSA keys (hivemind signs DHT records with RSA)")
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key.__setstate__({"_private_key": message.data})  # hivemind's own unpickling: no new key generated
        return cls(key, data)

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """The identity in ``path``, created there (mode 0400) on first use: a restarted peer keeps its id and key."""
        path = Path(path)
        if not path.exists():
            identity = cls.generate()
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(identity.protobuf)
            except OSError as error:
                raise IdentityError(f"cannot create identity file {path}: {error.strerror}") from None
            return identity
        try:
            data = path.read_bytes()
        except OSError as error:
            raise IdentityError(f"cannot read identity file {path}: {error.strerror}") from None
        try:
            return cls.from_protobuf(data)
        except IdentityError as error:
            raise IdentityError(f"identity file {path}: {error}") from None

    @functools.cached_property
    def peer_id(self) -> str:
        return peer_id_of_owner(self.owner_key)

    @functools.cached_property
    def validator(self) -> RSASignatureValidator:
        """The DHT record validator that signs with this identity's key."""
        return RSASignatureValidator(self.private_key)

    @property
    def owner_key(self) -> str:
        """How records and ``--trusted-verifiers`` name this identity: the hex of its subkey owner part."""
        return owner_key(self.validator)


@functools.lru_cache(maxsize=4096)
def peer_id_of_owner(owner_hex: str) -> str:
    """The libp2p peer id (base58) of the key in an owner part (hex of ``[owner:ssh-rsa ...]``); RecordError if none.

    The libp2p spec: sha2-256 multihash of the ``PublicKey`` protobuf holding the DER key."""
    try:
        owner = bytes.fromhex(owner_hex)
        if not (owner.startswith(OWNER_PREFIX) and owner.endswith(OWNER_SUFFIX)):
            raise ValueError("not an owner part")
        key = serialization.load_ssh_public_key(owner[len(OWNER_PREFIX):-len(OWNER_SUFFIX)])
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("not an RSA key")
    except ValueError as error:
        raise RecordError(f"signer key is not an RSA public key: {error}") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def certify_receipt_key(identity: Identity, receipt_key: bytes, dtype: str, issued_at: float) -> ReceiptCertificate:
    """A certificate, signed with ``identity``'s key, that ``receipt_key`` signs this peer's step receipts."""
    unsigned = ReceiptCertificate(identity.peer_id, identity.owner_key, receipt_key, dtype, issued_at)
    return ReceiptCertificate(**{**unsigned.to_wire(), "signature": identity.private_key.sign(unsigned.signed_bytes())})


def check_certificate(certificate: ReceiptCertificate, peer_id: str | None = None) -> None:
    """RecordError unless ``certificate`` is signed by the identity key of its peer (and that peer is ``peer_id``)."""
    if peer_id is not None and certificate.peer_id != peer_id:
        raise RecordError(f"receipt certificate of {certificate.peer_id}, expected one of {peer_id}")
    if peer_id_of_owner(certificate.owner_key) != certificate.peer_id:
        raise RecordError(f"receipt certificate of {certificate.peer_id} is signed by another peer's key")
    owner = bytes.fromhex(certificate.owner_key)[len(OWNER_PREFIX):-len(OWNER_SUFFIX)]
    if not RSAPublicKey.from_bytes(owner).verify(certificate.signed_bytes(), certificate.signature):
        raise RecordError(f"receipt certificate of {certificate.peer_id} has a bad signature")


def start_dht(identity: Identity, identity_path: Path | None = None, **kwargs) -> DHT:
    """A started DHT node running under ``identity`` (peer id and signing key); ``kwargs`` go to hivemind's DHT.

    p2pd reads its key from a file: ``identity_path`` when the identity lives in one, else a private
    temporary file removed once the daemon has started."""
    kwargs.setdefault("record_validators", [identity.validator])
    if identity_path is not None:
        return DHT(start=True, identity_path=str(identity_path), **kwargs)
    with tempfile.TemporaryDirectory(prefix="efedllm-identity-") as folder:
        path = Path(folder) / "identity.key"
        path.write_bytes(identity.protobuf)
        path.chmod(0o400)
        return DHT(start=True, identity_path=str(path), check_if_identity_free=False, **kwargs)
