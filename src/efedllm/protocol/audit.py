"""Audits of real traffic: what a client sends a verifier about one server's session, and how.

A client that audits a session (:mod:`efedllm.client.audit`) sends, for each server of it, one
:class:`AuditRequest` on the verifier's ``AuditService.rpc_audit``: the server's
:class:`~efedllm.common.receipts.ReceiptCertificate`, every step's signed receipt in order, and the
exact bytes of each step's input and output (the hidden states, each once, referenced by index).
The verifier recomputes the session with reference weights (:mod:`efedllm.verifier.audit`) and
answers an :class:`AuditVerdict`. The request travels as a stream of messages (metadata in the
first, hidden states spread over all), so a long session is not bound by one message's size.

A training step is audited alike: a :class:`TrainAuditRequest` on ``rpc_audit_training`` carries the
server's signed :class:`~efedllm.common.receipts.TrainReceipt`, the request's metadata bytes and the exact
tensors of the request and of the answer (:mod:`efedllm.verifier.training_audit` recomputes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, AsyncIterator

from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.common.receipts import ReceiptCertificate, StepReceipt, TrainReceipt
from efedllm.common.records import Count, Items, Positive, Text, WireRecord, require
from efedllm.protocol import codec
from efedllm.protocol.messages import WIRE_VERSION

MAX_AUDIT_STEPS = 8192
MAX_AUDIT_METADATA_BYTES = 8 * 2**20
MAX_AUDIT_BYTES = 512 * 2**20  # of hidden states in one request
CHUNK_BYTES = 2**20
VERDICTS = ("clean", "lie", "invalid")


@dataclass(frozen=True)
class AuditStep(WireRecord, kind="audit step"):
    """One step of the audited session: its receipt and which hidden states were its input and output."""

    receipt: StepReceipt
    input_index: Count
    output_index: Count


@dataclass(frozen=True)
class AuditRequest(WireRecord, kind="audit request", version=WIRE_VERSION):
    """One server's whole session, in order; ``hidden_states`` counts the hidden states sent beside it."""

    model: Annotated[str, Text(256)]
    certificate: ReceiptCertificate
    steps: Annotated[tuple[AuditStep, ...], Items(minimum=1, maximum=MAX_AUDIT_STEPS, noun="steps")]
    hidden_states: Positive

    def check(self) -> None:
        for step in self.steps:
            require(step.input_index < self.hidden_states and step.output_index < self.hidden_states,
                    "audit request names a hidden state it does not carry")


MAX_TRAIN_METADATA = 64 * 2**10


@dataclass(frozen=True)
class TrainAuditRequest(WireRecord, kind="train audit request", version=WIRE_VERSION):
    """One training request a server answered: its certificate and receipt, the request's packed metadata as
    sent, then beside it ``request_tensors`` serialised tensors of the request and ``answer_tensors`` of the answer."""

    model: Annotated[str, Text(256)]
    certificate: ReceiptCertificate
    receipt: TrainReceipt
    request_metadata: bytes
    request_tensors: Positive
    answer_tensors: Positive

    def check(self) -> None:
        require(isinstance(self.request_metadata, bytes) and len(self.request_metadata) <= MAX_TRAIN_METADATA,
                f"train audit request.request_metadata must be at most {MAX_TRAIN_METADATA} bytes")


@dataclass(frozen=True)
class AuditVerdict(WireRecord, kind="audit verdict", version=WIRE_VERSION):
    """``clean``: every step follows from its input; ``lie``: step ``step`` does not, and its receipt proves
    it; ``invalid``: the request proves nothing (bad signature, broken history, bytes that do not match)."""

    verdict: Annotated[str, Text(16)]
    reason: Annotated[str, Text(4096)] = ""
    step: int = -1

    def check(self) -> None:
        require(self.verdict in VERDICTS, f"audit verdict.verdict must be one of {VERDICTS}")


class AuditService(ServicerBase):
    """The verifier's audit endpoint; ``rpc_audit`` is implemented by the verifier node."""

    async def rpc_audit(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                        context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError

    async def rpc_audit_training(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                 context: P2PContext) -> runtime_pb2.ExpertResponse:
        raise NotImplementedError


def audit_messages(request: "AuditRequest | TrainAuditRequest", tensors: list) -> list[runtime_pb2.ExpertRequest]:
    """``request`` and its serialised hidden states as a stream of messages of about ``CHUNK_BYTES`` each."""
    messages, chunk, size = [], [], 0
    for tensor in tensors:
        chunk.append(tensor)
        size += len(tensor.buffer)
        if size >= CHUNK_BYTES:
            messages.append(chunk)
            chunk, size = [], 0
    messages.append(chunk)
    metadata = codec.pack_metadata(request.to_wire())
    return [runtime_pb2.ExpertRequest(uid="", tensors=part, metadata=metadata if index == 0 else b"")
            for index, part in enumerate(messages)]


async def read_audit(requests: AsyncIterator[runtime_pb2.ExpertRequest], kind: type = AuditRequest) -> tuple:
    """The request (an AuditRequest, or ``kind``) and its serialised tensors; RecordError when malformed or over
    the limits."""
    metadata, tensors, size = None, [], 0
    async for message in requests:
        if metadata is None:
            if len(message.metadata) > MAX_AUDIT_METADATA_BYTES:
                raise RecordError(f"audit metadata of {len(message.metadata)} bytes exceeds {MAX_AUDIT_METADATA_BYTES}")
            metadata = message.metadata
        size += sum(len(tensor.buffer) for tensor in message.tensors)
        if size > MAX_AUDIT_BYTES:
            raise RecordError(f"audit of more than {MAX_AUDIT_BYTES} bytes")
        tensors.extend(message.tensors)
    if metadata is None:
        raise RecordError("empty audit request")
    request = kind.from_wire(codec.unpack_metadata(metadata, MAX_AUDIT_METADATA_BYTES))
    return request, tensors


async def discard_audit(requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
    """Reads a request to its end (or to ``MAX_AUDIT_BYTES``) without keeping it: a refusal is answered after it."""
    size = 0
    async for message in requests:
        size += len(message.metadata) + sum(len(tensor.buffer) for tensor in message.tensors)
        if size > MAX_AUDIT_BYTES:
            return


async def submit_audit(p2p: P2P, verifier_peer_id: str, request: AuditRequest, tensors: list,
                       timeout: float = 120.0) -> AuditVerdict:
    """Send one audit to a verifier and return its verdict; raises on transport errors or a refusal."""
    return await _submit(p2p, verifier_peer_id, "rpc_audit", request, tensors, timeout)


async def submit_training_audit(p2p: P2P, verifier_peer_id: str, request: TrainAuditRequest, tensors: list,
                                timeout: float = 120.0) -> AuditVerdict:
    """Send one training audit to a verifier and return its verdict; raises on transport errors or a refusal."""
    return await _submit(p2p, verifier_peer_id, "rpc_audit_training", request, tensors, timeout)


async def _submit(p2p: P2P, verifier_peer_id: str, method: str, request, tensors: list, timeout: float) -> AuditVerdict:
    stub = AuditService.get_stub(p2p, PeerID.from_base58(verifier_peer_id))

    async def stream():
        for message in audit_messages(request, tensors):
            yield message

    answer = await getattr(stub, method)(stream(), timeout=timeout)
    return AuditVerdict.from_wire(codec.unpack_metadata(answer.metadata))
