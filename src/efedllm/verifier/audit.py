"""Judging an audit: does every step of a server's session follow from its inputs, as its receipts say?

:func:`judge_audit` takes one :class:`~efedllm.protocol.audit.AuditRequest` (a client's record of
one server's whole session) and answers an :class:`AuditOutcome`:

1. **invalid** when the request proves nothing: the certificate is not signed by the server's
   identity key, a receipt is not signed by the certified receipt key, the receipts' history
   chain is broken (a step left out or reordered), or the bytes sent do not hash to the receipts'
   digests. Nobody is blamed: a client cannot frame a server with anything it made itself.
2. **lie** when the receipts are genuine but an output does not follow from the inputs: the
   session is recomputed with the reference weights, one causal pass over the inputs as the
   server's cache held them (a step at an earlier position crops it, as servers do), and compared
   token by token (:func:`~efedllm.models.comparison.compare_outputs`, with the tolerances of the
   dtype the server's certificate names). The signed receipt of the first wrong step is the proof.
3. **clean** otherwise; ``work`` (rows × tokens) is the verified work the ledger may credit.

Pure but for the reference model's compute; :class:`~efedllm.verifier.node.Verifier` calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from efedllm.common.errors import RecordError
from efedllm.common.receipts import extend_history, session_origin, tensor_digest
from efedllm.common.spans import Span
from efedllm.dht.identity import check_certificate
from efedllm.models.comparison import Tolerances, compare_outputs, token_metrics
from efedllm.protocol import codec
from efedllm.protocol.audit import AuditRequest


@dataclass(frozen=True)
class AuditOutcome:
    peer_id: str
    span: Span | None
    verdict: str  # "clean", "lie" or "invalid"
    reason: str = ""
    step: int = -1  # the first wrong step of a lie
    work: int = 0  # rows × tokens of the session's steps


def judge_audit(request: AuditRequest, tensors: list, reference, tolerances_for: Callable[[str], Tolerances]) -> AuditOutcome:
    """The outcome of one audit (see the module docstring); ``reference`` holds every block in float32."""
    peer = request.certificate.peer_id
    try:
        span, hidden = _check_receipts(request, tensors, reference)
    except RecordError as error:
        return AuditOutcome(peer, None, "invalid", str(error))
    shape_error = _check_shapes(request, hidden, reference.hidden_size)
    if shape_error is not None:
        return AuditOutcome(peer, span, "lie", shape_error[1], shape_error[0])
    lie = _first_wrong_step(request, hidden, reference, span, tolerances_for(request.certificate.dtype))
    if lie is not None:
        return AuditOutcome(peer, span, "lie", lie[1], lie[0])
    work = sum(step.receipt.rows * step.receipt.tokens for step in request.steps)
    return AuditOutcome(peer, span, "clean", work=work)


def _check_receipts(request: AuditRequest, tensors: list, reference) -> tuple[Span, list[torch.Tensor]]:
    """The session's span and its hidden states (float32), once every signature, digest and the history hold."""
    certificate = request.certificate
    check_certificate(certificate)
    first = request.steps[0].receipt
    wire_format, span, session_id = first.wire_format, first.span, first.session_id
    if not reference.span.contains(span):
        raise RecordError(f"blocks {span} are not inside the model {reference.span}")
    groups = codec.hidden_groups(tensors, wire_format)
    if len(groups) != request.hidden_states:
        raise RecordError(f"{len(groups)} hidden states sent, {request.hidden_states} announced")
    digests = [tensor_digest(group) for group in groups]
    history = session_origin(session_id)
    for index, step in enumerate(request.steps):
        receipt = step.receipt
        if (receipt.peer_id, receipt.session_id, receipt.span, receipt.wire_format) != (certificate.peer_id, session_id,
                                                                                          span, wire_format):
            raise RecordError(f"step {index}'s receipt is of another server, session, span or wire format")
        if not receipt.verify(certificate.receipt_key):
            raise RecordError(f"step {index}'s receipt is not signed by the certified receipt key")
        if digests[step.input_index] != receipt.input_digest or digests[step.output_index] != receipt.output_digest:
            raise RecordError(f"step {index}'s hidden states are not the bytes its receipt commits to")
        history = extend_history(history, receipt.position, receipt.input_digest)
        if history != receipt.history:
            raise RecordError(f"step {index}'s receipt does not follow the steps before it (one left out or reordered)")
    return span, [codec.decode_hidden(group, wire_format, torch.float32) for group in groups]


def _check_shapes(request: AuditRequest, hidden: list[torch.Tensor], hidden_size: int) -> tuple[int, str] | None:
    """A signed step whose input or output is not [rows, tokens, hidden] as its receipt says is a lie itself."""
    for index, step in enumerate(request.steps):
        receipt = step.receipt
        expected = (receipt.rows, receipt.tokens, hidden_size)
        for name, tensor in (("input", hidden[step.input_index]), ("output", hidden[step.output_index])):
            if tuple(tensor.shape) != expected:
                return index, f"step {index}'s {name} has shape {tuple(tensor.shape)}, its receipt says {expected}"
            if not torch.isfinite(tensor).all():
                return index, f"step {index}'s {name} holds NaN or infinite values"
    return None


def _first_wrong_step(request: AuditRequest, hidden: list[torch.Tensor], reference, span: Span,
                      tolerances: Tolerances) -> tuple[int, str] | None:
    """Replays the session's cache writes and recomputes each run of contiguous steps in one causal pass."""
    sequence, pending = None, []  # inputs as the server's cache holds them [rows, T, hidden]; steps not yet checked
    for index, step in enumerate(request.steps):
        receipt, inputs = step.receipt, hidden[step.input_index]
        length = 0 if sequence is None else sequence.shape[1]
        if receipt.position > length or (sequence is not None and sequence.shape[0] != receipt.rows):
            return index, f"step {index} at position {receipt.position} with {receipt.rows} rows does not fit a cache " \
                          f"of {length} tokens: the server answered a step it must refuse"
        if receipt.position < length:
            wrong = _check_run(pending, sequence, reference, span, tolerances)
            if wrong is not None:
                return wrong
            sequence, pending = sequence[:, :receipt.position], []
        sequence = inputs if sequence is None or sequence.shape[1] == 0 else torch.cat([sequence, inputs], dim=1)
        pending.append((index, receipt.position, hidden[step.output_index]))
    return _check_run(pending, sequence, reference, span, tolerances)


@torch.inference_mode()
def _check_run(pending: list, sequence: torch.Tensor, reference, span: Span, tolerances: Tolerances):
    """(first wrong step, why) among ``pending`` steps, whose inputs end ``sequence``; None when all are right."""
    if not pending:
        return None
    expected = reference(sequence, position=0, cache=None, blocks=span)  # [rows, T, hidden]
    references = [expected[:, start:start + output.shape[1]] for _, start, output in pending]
    outputs = [output for _, _, output in pending]
    comparison = compare_outputs(torch.cat(references, dim=1), torch.cat(outputs, dim=1), tolerances)
    if comparison.passed:
        return None
    for (index, _, output), wanted in zip(pending, references):  # the proof: the first step with a token off
        cosine, relative = token_metrics(wanted, output)
        if bool(((cosine < tolerances.min_cosine) | (relative > tolerances.max_relative_l2)).any()):
            return index, f"step {index} does not follow from its inputs: {comparison.reason}"
    return pending[0][0], f"the session does not follow from its inputs: {comparison.reason}"
