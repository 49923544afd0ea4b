"""Judging a training audit: does a server's signed answer to one training request follow from the request?

:meth:`TrainingJudge.judge` takes one :class:`~efedllm.protocol.audit.TrainAuditRequest` (a client's record of
one training forward or backward a server answered, :mod:`efedllm.server.training`) and answers an
:class:`~efedllm.verifier.audit.AuditOutcome`:

1. **invalid** when the request proves nothing: the certificate is not signed by the server's identity key,
   the receipt is not signed by the certified receipt key or names another server, or the bytes sent do not
   hash to the receipt's digests. Nobody is blamed: a client cannot frame a server with bytes it made itself.
2. **lie** when the receipt is genuine but the answer does not follow: it is malformed, or the request
   recomputed with the reference weights (:class:`~efedllm.models.adapters.TrainableSpan`, the very code a
   server runs) gives other outputs (forward, the forward audit's tolerances) or other gradients (backward:
   any tensor whose relative L2 error exceeds the gradient tolerance). Noisy, zero and stale-adapter
   gradients (:mod:`efedllm.server.faults`) all land here.
3. **clean** otherwise; ``work`` (rows × tokens, twice for a backward, which recomputes the forward) is the
   verified work the ledger may credit.
"""

from __future__ import annotations

from typing import Callable

import torch

from efedllm.common.errors import RecordError
from efedllm.common.receipts import tensor_digest, train_digest
from efedllm.dht.identity import check_certificate
from efedllm.models.adapters import AdapterInputError, TrainableSpan, TrainableViews, spec_of
from efedllm.models.comparison import Tolerances, compare_outputs
from efedllm.protocol import codec
from efedllm.protocol.audit import TrainAuditRequest
from efedllm.protocol.messages import TrainRequest
from efedllm.verifier.audit import AuditOutcome

GRADIENT_FLOOR = 1e-4  # a tensor's error is relative to at least this share of the largest gradient's norm


def gradient_errors(expected: list[torch.Tensor], answered: list[torch.Tensor]) -> list[float]:
    """Relative L2 error of each answered gradient (``inf`` for a wrong shape or a non-finite value).

    The denominator is the tensor's own norm, but at least ``GRADIENT_FLOOR`` times the largest norm among
    ``expected``: a gradient that is zero or tiny by construction (LoRA's A while B is still zero) is judged
    against the step's scale, not against nothing. Pure."""
    scale = max((float(tensor.norm()) for tensor in expected), default=0.0) * GRADIENT_FLOOR
    errors = []
    for want, got in zip(expected, answered):
        if want.shape != got.shape or not bool(torch.isfinite(got).all()):
            errors.append(float("inf"))
            continue
        denominator = max(float(want.norm()), scale, 1e-30)
        errors.append(float((got.float() - want.float()).norm()) / denominator)
    return errors


class TrainingJudge:
    """Recomputes training requests against ``reference`` (every block, float32); keeps a few trainable views."""

    def __init__(self, reference, tolerances_for: Callable[[str], Tolerances],
                 gradient_tolerance_for: Callable[[str], float], max_views: int = 8) -> None:
        self.reference, self.tolerances_for, self.gradient_tolerance_for = reference, tolerances_for, gradient_tolerance_for
        self._views = TrainableViews(reference, max_views)

    def judge(self, request: TrainAuditRequest, tensors: list) -> AuditOutcome:
        """The outcome of one training audit (see the module docstring)."""
        peer = request.certificate.peer_id
        try:
            train, inputs = self._check_receipt(request, tensors)
            view = self._view(train)
        except (RecordError, AdapterInputError, ValueError) as error:
            return AuditOutcome(peer, None, "invalid", str(error))
        receipt = request.receipt
        try:
            answer = codec.decode_tensors(tensors[request.request_tensors:], len(train.names) + 1 if train.backward else 1)
        except RecordError as error:
            return AuditOutcome(peer, train.span, "lie", f"the signed answer is malformed: {error}", 0)
        try:
            reason = self._wrong(train, view, inputs, answer, request.certificate.dtype)
        except AdapterInputError as error:  # a request an honest server refuses: the client's own making
            return AuditOutcome(peer, train.span, "invalid", str(error))
        if reason is not None:
            return AuditOutcome(peer, train.span, "lie", reason, 0)
        return AuditOutcome(peer, train.span, "clean", work=receipt.rows * receipt.tokens * (2 if train.backward else 1))

    def _check_receipt(self, request: TrainAuditRequest, tensors: list) -> tuple[TrainRequest, list[torch.Tensor]]:
        certificate, receipt = request.certificate, request.receipt
        check_certificate(certificate)
        if receipt.peer_id != certificate.peer_id:
            raise RecordError(f"the receipt is of {receipt.peer_id}, the certificate of {certificate.peer_id}")
        if not receipt.verify(certificate.receipt_key):
            raise RecordError("the receipt is not signed by the certified receipt key")
        if len(tensors) != request.request_tensors + request.answer_tensors:
            raise RecordError(f"{len(tensors)} tensors sent, {request.request_tensors + request.answer_tensors} announced")
        sent, answered = tensors[:request.request_tensors], tensors[request.request_tensors:]
        if train_digest(request.request_metadata, sent) != receipt.request_digest or \
                tensor_digest(answered) != receipt.answer_digest:
            raise RecordError("the request or the answer is not the bytes the receipt commits to")
        train = TrainRequest.from_wire(codec.unpack_metadata(request.request_metadata))
        if (train.span, train.backward) != (receipt.span, receipt.backward):
            raise RecordError("the receipt names another span or direction than the request")
        if not self.reference.span.contains(train.span):
            raise RecordError(f"blocks {train.span} are not inside the model {self.reference.span}")
        return train, codec.decode_tensors(sent, train.tensor_count)

    def _view(self, train: TrainRequest) -> TrainableSpan:
        return self._views.get(train.span, spec_of(train))

    def _wrong(self, train: TrainRequest, view: TrainableSpan, inputs: list[torch.Tensor], answer: list[torch.Tensor],
               dtype: str) -> str | None:
        """Why the answer does not follow from the request, or None when it does."""
        hidden = inputs[0]
        adapters = dict(zip(train.names, inputs[1 + int(train.backward):]))
        if not train.backward:
            comparison = compare_outputs(view.forward(hidden, adapters), answer[0].float(), self.tolerances_for(dtype))
            return None if comparison.passed else f"the training forward does not follow: {comparison.reason}"
        grad_hidden, grads = view.backward(hidden, adapters, inputs[1])
        errors = gradient_errors([grad_hidden, *grads.values()], answer)
        tolerance = self.gradient_tolerance_for(dtype)
        names = ["inputs", *grads]
        wrong = [(name, error) for name, error in zip(names, errors) if not error <= tolerance]
        if not wrong:
            return None
        worst = max(wrong, key=lambda item: item[1])
        return f"{len(wrong)} of {len(names)} gradients are off (worst: {worst[0]}, relative L2 {worst[1]:.3g} > {tolerance:g})"
