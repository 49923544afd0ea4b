"""Training requests on a server: the forward or the backward of a span for a client's adapters, holding nothing.

A :class:`~efedllm.protocol.messages.TrainRequest` names the blocks (inside this server's span), what is trained
and the client's tensors; the server's base weights stay frozen and shared with inference. The step runs on the
server's one compute thread, between inference passes. Nothing of a request is kept: a backward recomputes its
forward (the client sends the inputs again), so a client whose server fails replays the step elsewhere.

:class:`TrainingServicer` keeps one :class:`~efedllm.models.adapters.TrainableSpan` per (blocks, what is trained),
at most ``max_trainables`` (least recently used dropped): building one copies the module tree, not the weights.
A forward with a ``step_id`` keeps its autograd graph (at most ``KEPT_BYTES`` of estimated activations in all,
each for ``KEPT_SECONDS``, per requesting peer and step id) for the backward that follows; that backward still
carries the inputs, and the graph is used only when they are exactly the same, else (or when it was dropped)
the forward is recomputed: a server that fails in between loses nothing another server cannot redo.

A request with ``receipts`` is answered with a signed :class:`~efedllm.common.receipts.TrainReceipt` over the exact
bytes of the request and of the answer, and the certificate of the receipt key: the client can send it to a
verifier, which recomputes the request with reference weights (:mod:`efedllm.verifier.training_audit`). The
server's fault mode (:mod:`efedllm.server.faults`, tests only) sees the tensors and the gradients.
Call order: ``handle(request)`` from the span servicer's ``rpc_train``.
"""

from __future__ import annotations

import collections
import logging
import time

import torch
from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.common.receipts import ReceiptCertificate, ReceiptSigner, TrainReceipt, tensor_digest, train_digest
from efedllm.models.adapters import AdapterInputError, KeptForward, TrainableSpan, TrainableViews, spec_of
from efedllm.models.sessions import SpanSessions
from efedllm.protocol import codec
from efedllm.protocol.messages import Reply, TrainRequest
from efedllm.server.faults import FaultMode

logger = logging.getLogger(__name__)
MAX_TRAIN_TOKENS = 16384  # rows x tokens of one training request: its activations are recomputed and kept for backward
KEPT_BYTES = 2 * 2**30  # forward graphs kept for their backward, estimated (activation_bytes)
KEPT_SECONDS = 300.0
PEER_SHARE = 0.5  # of KEPT_BYTES one peer's kept forwards may hold
MAX_IN_FLIGHT_PER_PEER = 2  # training requests of one peer queued or computing: a flood waits on no one else


def activation_bytes(config, blocks: int, rows: int, tokens: int, element_bytes: int = 4) -> int:
    """An estimate of what a forward keeps for its backward: per token and block the projections' and MLP's
    inputs and outputs (~14 hidden and 3 intermediate vectors) and each head's attention row. Pure."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    per_token = 14 * hidden + 3 * intermediate + 2 * heads * tokens
    return blocks * rows * tokens * per_token * element_bytes


class KeptForwards:
    """Forward graphs by (peer, step id), oldest dropped beyond ``max_bytes`` (a peer's own oldest beyond its
    ``peer_share`` of them), each dropped after ``ttl`` s."""

    def __init__(self, max_bytes: int = KEPT_BYTES, ttl: float = KEPT_SECONDS, peer_share: float = PEER_SHARE) -> None:
        self.max_bytes, self.ttl, self.peer_share = max_bytes, ttl, peer_share
        self._kept: collections.OrderedDict[tuple[str, str], tuple[KeptForward, int, float]] = collections.OrderedDict()
        self.bytes = 0

    def put(self, key: tuple[str, str], kept: KeptForward, size: int) -> None:
        self.pop(key)
        if size > self.max_bytes * self.peer_share:
            return
        self._kept[key] = (kept, size, time.monotonic() + self.ttl)
        self.bytes += size
        while self.bytes > self.max_bytes or self._expired():
            self._drop(next(iter(self._kept)))
        own = [other for other in self._kept if other[0] == key[0]]
        while sum(self._kept[other][1] for other in own) > self.max_bytes * self.peer_share:
            self._drop(own.pop(0))

    def pop(self, key: tuple[str, str]) -> KeptForward | None:
        entry = self._kept.get(key)
        if entry is None:
            return None
        self._drop(key)
        return entry[0] if entry[2] > time.monotonic() else None

    def _expired(self) -> bool:
        return bool(self._kept) and next(iter(self._kept.values()))[2] <= time.monotonic()

    def _drop(self, key) -> None:
        self.bytes -= self._kept.pop(key)[1]

    def __len__(self) -> int:
        return len(self._kept)


class TrainingServicer:
    def __init__(self, sessions: SpanSessions, compute, max_trainables: int = 8, fault: FaultMode | None = None,
                 signer: ReceiptSigner | None = None, certificate: ReceiptCertificate | None = None,
                 peer_id: str = "") -> None:
        self.sessions, self.compute = sessions, compute
        self.fault = fault or FaultMode()
        self.signer, self.certificate, self.peer_id = signer, certificate, peer_id
        self._views = TrainableViews(sessions.model, max_trainables)
        self.kept = KeptForwards()  # touched on the compute thread only
        self.in_flight: collections.Counter[str] = collections.Counter()  # training requests per peer, on the loop
        self.requests_served = 0

    async def handle(self, request: runtime_pb2.ExpertRequest, requester: str = "") -> runtime_pb2.ExpertResponse:
        """The answer to a training request: the outputs, or the input gradients then the tensors' gradients."""
        if self.in_flight[requester] >= MAX_IN_FLIGHT_PER_PEER:
            return codec.error_reply(f"training request refused: peer {requester} already has "
                                     f"{MAX_IN_FLIGHT_PER_PEER} training requests in flight here")
        self.in_flight[requester] += 1
        try:
            return await self._answer(request, requester)
        finally:
            self.in_flight[requester] -= 1
            if not self.in_flight[requester]:
                del self.in_flight[requester]

    async def _answer(self, request: runtime_pb2.ExpertRequest, requester: str) -> runtime_pb2.ExpertResponse:
        try:
            train = codec.read_message(TrainRequest, request)
            if train.receipts and self.signer is None:
                raise RecordError("this server signs no receipts")
            tensors = codec.decode_tensors(request.tensors, train.tensor_count)
            trainable = self._trainable(train)
            hidden, grad_outputs = tensors[0], tensors[1] if train.backward else None
            if hidden.dim() != 3 or hidden.shape[0] * hidden.shape[1] > MAX_TRAIN_TOKENS:
                raise AdapterInputError(f"hidden states must be [batch, tokens, hidden] with at most {MAX_TRAIN_TOKENS} "
                                        f"rows x tokens, got {tuple(hidden.shape)}")
            adapters = self.fault.training_tensors(dict(zip(train.names, tensors[1 + int(train.backward):])),
                                                   train.backward)
            key = (requester, train.step_id) if train.step_id else None
            answer = await self.compute(self._run, trainable, hidden, adapters, grad_outputs, key)
        except (RecordError, AdapterInputError, ValueError) as error:
            return codec.error_reply(f"training request refused: {error}")
        self.requests_served += 1
        encoded = codec.encode_tensors(answer)
        if not train.receipts:
            return codec.ok_reply(encoded)
        return codec.response(Reply(certificate=self.certificate, train_receipt=self._receipt(train, request, encoded)),
                              encoded)

    def _receipt(self, train: TrainRequest, request: runtime_pb2.ExpertRequest, answer: list) -> TrainReceipt:
        rows, tokens = (int(size) for size in request.tensors[0].size[:2])  # of the hidden states, checked 3-d
        return self.signer.sign(TrainReceipt(self.peer_id, train.span, train.backward, rows, tokens,
                                             train_digest(request.metadata, request.tensors), tensor_digest(answer)))

    def _run(self, trainable: TrainableSpan, hidden, adapters, grad_outputs, key) -> list[torch.Tensor]:
        if grad_outputs is None and key is None:
            return [trainable.forward(hidden, adapters)]
        if grad_outputs is None:
            outputs, kept = trainable.forward_kept(hidden, adapters)
            config = self.sessions.model.config
            self.kept.put(key, kept, activation_bytes(config, trainable.blocks.length, *hidden.shape[:2]))
            return [outputs]
        kept = self.kept.pop(key) if key is not None else None
        grad_hidden, grads = self.fault.corrupt_gradients(*trainable.backward(hidden, adapters, grad_outputs, kept))
        return [grad_hidden, *grads.values()]  # in the request's names order

    def _trainable(self, train: TrainRequest) -> TrainableSpan:
        """The trainable view for the request's blocks and spec (built on first use); ValueError if it does not fit."""
        if not self.sessions.model.span.contains(train.span):
            raise AdapterInputError(f"blocks {train.span} are not inside this server's span {self.sessions.model.span}")
        return self._views.get(train.span, spec_of(train))
