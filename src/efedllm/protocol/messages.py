"""The messages peers exchange over P2P: requests, replies and deliveries, strictly validated and versioned.

Every message is a :class:`~efedllm.common.records.WireRecord`: msgpack metadata beside the tensors
of an ``ExpertRequest`` / ``ExpertResponse`` (:mod:`efedllm.protocol.codec`). A peer that reads
another ``WIRE_VERSION`` rejects the message, naming both versions.

Who sends what (:mod:`efedllm.protocol.service` has the handlers):

- client or verifier -> server: :class:`OpenSessionRequest`, :class:`StepRequest`,
  :class:`CloseSessionRequest`; the server answers each call with a :class:`Reply`.
- server -> next server: the :class:`StepRequest` for the next :class:`Hop`.
- last server -> requester: a :class:`DeliveredStep` (:mod:`efedllm.protocol.delivery`).
- client -> server: :class:`TrainRequest` (a training forward or backward of a span, no session); the
  server answers a :class:`Reply` with the outputs, or the input and tensor gradients, beside it.
- joining server -> server: :class:`WeightsRequest`; the answer is a :class:`Reply`, a
  :class:`WeightsHeader`, then the payload (:mod:`efedllm.server.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from efedllm.common.receipts import ReceiptCertificate, StepReceipt, TrainReceipt
from efedllm.common.records import Count, Identifier, Items, Number, PeerId, Positive, Text, WireRecord, require
from efedllm.common.spans import Span

WIRE_VERSION = 5  # 5: step receipts (common.receipts); 4: sessions are owned (upstream, batch at open), chains visit a peer once; 3: typed replies
MAX_ROUTE_HOPS = 64
MAX_ERROR_LENGTH = 4096
MAX_TRAIN_TENSORS = 1024  # trainable tensors of one training request (LoRA: 2 per projection per block)
WireFormat = Annotated[str, Text(16)]
ErrorText = Annotated[str, Text(MAX_ERROR_LENGTH)]


@dataclass(frozen=True)
class Hop(WireRecord, kind="hop"):
    """One server of a chain: which peer runs which blocks under which of its sessions."""

    peer_id: PeerId
    span: Span
    session_id: Identifier


@dataclass(frozen=True)
class Delivery(WireRecord, kind="delivery"):
    """Where the last hop of a chain sends a step's output: the requesting peer and its step id.

    With a delivery, every hop computes and hands its output on, and the last hop sends it to the
    requester's :class:`~efedllm.protocol.delivery.DeliveryServicer`: the answer does not travel back
    along the chain. A hop that cannot serve the step, or finds its next hop gone, reports the error
    there, naming the peer to blame (:mod:`efedllm.server.handler`).
    """

    peer_id: PeerId
    step_id: Identifier


@dataclass(frozen=True)
class StepRequest(WireRecord, kind="step request", version=WIRE_VERSION):
    """Metadata of one inference step; the hidden states travel beside it as a tensor.

    ``position`` is how many tokens the session already holds when the step starts: a server
    whose cache is longer crops it back first (so a retried step is idempotent), one whose cache
    is shorter rejects the step as out of order. ``next_hops`` is the rest of the chain that the
    server forwards its output to; empty means answer the caller. ``deliver_to`` (optional) makes
    the last hop send the output straight to that peer instead of back along the chain.

    ``receipts`` asks every hop for a signed :class:`~efedllm.common.receipts.StepReceipt` and for
    every hop's output to reach the requester: each hop then receives the outputs of the hops
    before it (its input last) with their receipts in ``upstream_receipts``, checks that its input
    is byte for byte what the previous receipt committed to, and passes them on with its own
    output and receipt; the last hop answers all of them (:mod:`efedllm.server.handler`).
    """

    session_id: Identifier
    span: Span
    position: Count
    wire_format: WireFormat = "float32"
    next_hops: Annotated[tuple[Hop, ...], Items(maximum=MAX_ROUTE_HOPS, noun="hops")] = ()
    deliver_to: Delivery | None = None
    receipts: bool = False
    upstream_receipts: Annotated[tuple[StepReceipt, ...], Items(maximum=MAX_ROUTE_HOPS, noun="receipts")] = ()

    def check(self) -> None:
        peers = [hop.peer_id for hop in self.next_hops]
        require(len(set(peers)) == len(peers), "step request.next_hops visits a peer more than once (a loop)")
        require(self.receipts or not self.upstream_receipts, "step request has upstream receipts but asks for none")

    def for_next_hop(self, receipts: tuple[StepReceipt, ...] = ()) -> "StepRequest":
        """The request this step's server sends on to ``next_hops[0]``, with the chain's ``receipts`` so far
        (the upstream ones and its own) when receipts are asked for."""
        following = self.next_hops[0]
        receipts = receipts if self.receipts else ()
        return StepRequest(following.session_id, following.span, self.position, self.wire_format, self.next_hops[1:],
                           self.deliver_to, self.receipts, receipts)


@dataclass(frozen=True)
class OpenSessionRequest(WireRecord, kind="open-session request", version=WIRE_VERSION):
    """Open a session of ``batch`` rows and up to ``max_length`` tokens; it belongs to the peer that asks.

    ``upstream`` names the one other peer that may step it: the previous hop of the owner's chain,
    which forwards the owner's steps (:mod:`efedllm.server.admission`)."""

    session_id: Identifier
    span: Span
    max_length: Positive
    upstream: PeerId | None = None
    batch: Positive = 1


@dataclass(frozen=True)
class CloseSessionRequest(WireRecord, kind="close-session request", version=WIRE_VERSION):
    session_id: Identifier


@dataclass(frozen=True)
class Reply(WireRecord, kind="reply", version=WIRE_VERSION):
    """A server's answer to a call: ``error`` is None when the call succeeded (its tensors travel beside it).

    ``failed_peer`` names the hop that failed when it is not the one answering (a step forwarded
    along the chain whose next hop broke). ``receipts``: a step's receipts, when asked for, one per
    hop in chain order; ``certificate``: what an open-session reply carries, the server's
    :class:`~efedllm.common.receipts.ReceiptCertificate` (a training reply with ``train_receipt`` too).
    """

    error: ErrorText | None = None
    failed_peer: PeerId | None = None
    receipts: Annotated[tuple[StepReceipt, ...], Items(maximum=MAX_ROUTE_HOPS, noun="receipts")] = ()
    certificate: ReceiptCertificate | None = None
    train_receipt: TrainReceipt | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, error: str, failed_peer: str | None = None) -> "Reply":
        """An error reply; the message is cut to ``MAX_ERROR_LENGTH`` characters."""
        return cls(error[:MAX_ERROR_LENGTH] or "unknown error", failed_peer)

    def believed_from(self, reporter: str) -> "Reply":
        """This failed reply as its receiver should take it from ``reporter``: blaming ``reporter`` itself
        unless it names another peer, and then blaming nobody.

        A peer is believed about itself only: when it names another as the one that failed, either of
        the two may be lying, so the receiver blames no one and finds the culprit itself."""
        if self.failed_peer is None or self.failed_peer == reporter:
            return Reply(self.error, reporter)
        return Reply.failure(f"{self.error} (as {reporter} reports of {self.failed_peer})")


@dataclass(frozen=True)
class DeliveredStep(WireRecord, kind="delivered step", version=WIRE_VERSION):
    """What a hop delivers to the requester of step ``step_id``: the chain's :class:`Reply`.

    From the last hop, a successful reply with the step's output as tensors beside it; from any hop,
    a failed one, whose ``failed_peer`` names the hop that could not be reached or answered with an error.
    """

    step_id: Identifier
    reply: Reply = Reply()


@dataclass(frozen=True)
class WeightsRequest(WireRecord, kind="weights request", version=WIRE_VERSION):
    """Ask a server for the packed weights of ``span`` (inside its own span): ``--weights-from``."""

    span: Span


@dataclass(frozen=True)
class WeightsHeader(WireRecord, kind="weights header", version=WIRE_VERSION):
    """Precedes a weights payload: its size, its dense-equivalent size, and how it was compressed.

    ``compression`` is the sender's :meth:`CompressionConfig.signature` (None: dense weights).
    """

    span: Span
    dtype: WireFormat
    payload_bytes: Positive
    dense_bytes: Positive
    compression: dict | None


TensorName = Annotated[str, Text(128, identifier=True)]


@dataclass(frozen=True)
class TrainRequest(WireRecord, kind="train request", version=WIRE_VERSION):
    """A training step of ``span`` (inside the server's span) for whole sequences, holding no state: the
    forward (outputs), or with ``backward`` the gradients for the inputs and for each of ``names``'s
    tensors given the output gradients (the server recomputes the forward first).

    Tensors beside it, float32: the hidden states [batch, tokens, hidden], the output gradients (backward
    only), then the client's trainable tensors in ``names``'s order (:mod:`efedllm.models.adapters`:
    ``method`` lora with ``rank``, ``alpha`` and ``targets``, deep-ptune with ``prompts``, or ptune: none, the
    prompts are the client's own inputs)."""

    span: Span
    method: Annotated[str, Text(16)]
    names: Annotated[tuple[TensorName, ...], Items(maximum=MAX_TRAIN_TENSORS, noun="tensor names")] = ()
    backward: bool = False
    rank: Count = 0
    alpha: Annotated[float, Number(minimum=0.0, maximum=1e6)] = 0.0
    targets: Annotated[tuple[Annotated[str, Text(64, identifier=True)], ...], Items(maximum=16, noun="targets")] = ()
    prompts: Count = 0
    receipts: bool = False  # answer with a signed TrainReceipt and the certificate of its key
    step_id: Annotated[str, Text(64)] = ""  # a forward's backward will come with this id: the server may keep its graph

    def check(self) -> None:
        require(len(set(self.names)) == len(self.names), "train request.names names a tensor twice")
        require(self.method in ("lora", "ptune", "deep-ptune"),
                f"train request.method must be lora, ptune or deep-ptune, got {self.method!r}")

    @property
    def tensor_count(self) -> int:
        return 1 + int(self.backward) + len(self.names)
