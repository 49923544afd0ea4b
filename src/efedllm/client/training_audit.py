"""A client's checks of the training requests servers answer: receipts on every one, a share recomputed.

With training audits on (:attr:`RemoteClientConfig.audits_training`), every training request asks for a signed
:class:`~efedllm.common.receipts.TrainReceipt`, and :meth:`TrainingAuditor.evidence` checks it against the
exact bytes sent and received: a missing, foreign or mismatched receipt fails the call like a broken server.
After each answer the client draws, privately and with probability ``fraction``, whether a trusted verifier
recomputes it (:mod:`efedllm.verifier.training_audit`) *before* the answer is used. All requests look alike
to a server and the draw comes after its answer, so a server that corrupts a share of its answers, chosen
any way, has each corrupted one caught with probability ``fraction``. A lie is redone on another server
and the verifier deactivates the liar for good, as for a forward lie.

Call order: ``evidence(exchange, peer_id, request)`` after each answer -> ``draw()`` -> when it says yes,
the host's ``audit_training(evidence, tensors)``.
"""

from __future__ import annotations

import random

from efedllm.common.errors import RecordError
from efedllm.common.receipts import tensor_digest, train_digest
from efedllm.dht.identity import check_certificate
from efedllm.protocol.audit import TrainAuditRequest
from efedllm.protocol.messages import TrainRequest
from efedllm.protocol.service import TrainExchange


class TrainingAuditor:
    """Checks receipts and draws the audited share; counts what it saw. The constructor does no I/O."""

    def __init__(self, model: str, fraction: float, seed: int | None = None) -> None:
        self.model, self.fraction = model, fraction
        self._random = random.Random(seed)
        self._certified: dict[str, bytes] = {}  # peer id -> its receipt key, once its certificate was checked
        self.audited = self.lies = self.unanswered = 0

    def draw(self) -> bool:
        return self.fraction > 0 and self._random.random() < self.fraction

    def evidence(self, exchange: TrainExchange, peer_id: str, request: TrainRequest) -> TrainAuditRequest:
        """What a verifier needs to judge this answer; RecordError when the receipt does not bind it to ``peer_id``."""
        receipt, certificate = exchange.reply.train_receipt, exchange.reply.certificate
        if receipt is None or certificate is None:
            raise RecordError(f"{peer_id} answered a training request without the receipt it asked for")
        if self._certified.get(peer_id) != certificate.receipt_key:
            check_certificate(certificate, peer_id)
            self._certified[peer_id] = certificate.receipt_key
        if receipt.peer_id != peer_id or not receipt.verify(certificate.receipt_key):
            raise RecordError(f"the training receipt from {peer_id} is not signed by its certified receipt key")
        if (receipt.span, receipt.backward) != (request.span, request.backward):
            raise RecordError(f"the training receipt from {peer_id} names another span or direction")
        if receipt.request_digest != train_digest(exchange.request_metadata, exchange.request_tensors) or \
                receipt.answer_digest != tensor_digest(exchange.answer_tensors):
            raise RecordError(f"the training receipt from {peer_id} commits to other bytes than were exchanged")
        return TrainAuditRequest(self.model, certificate, receipt, exchange.request_metadata,
                                 len(exchange.request_tensors), len(exchange.answer_tensors))
