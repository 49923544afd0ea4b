"""A client's audits of its own sessions: receipts checked on every step, whole sessions sent to verifiers.

With receipts on (:attr:`RemoteClientConfig.wants_receipts`), every step of every session asks each
hop for a signed receipt and every hop's output (:mod:`efedllm.common.receipts`), and
:func:`outputs_with_receipts` checks them: each hop's input is byte for byte the previous hop's
output. All sessions look alike to servers; the client alone decides, privately and at random with
probability ``audit_fraction``, which sessions it keeps a :class:`SessionAudit` of. When an audited
session ends, each of its servers' sessions goes to a trusted verifier as one
:class:`~efedllm.protocol.audit.AuditRequest` (:mod:`efedllm.verifier.audit` recomputes it).

A server that corrupts any share of steps, chosen by any rule, cannot know which sessions are
audited: each of its corrupted sessions is caught with probability ``audit_fraction``, so after K
of them it is still undetected with probability ``(1 - audit_fraction) ** K``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from efedllm.common.errors import RecordError
from efedllm.common.receipts import ReceiptCertificate, StepReceipt, check_chain, tensor_digest
from efedllm.common.spans import Span
from efedllm.protocol import codec
from efedllm.protocol.audit import AuditRequest, AuditStep, AuditVerdict
from efedllm.protocol.messages import Hop


class AuditRecord(NamedTuple):
    """One submitted audit: the server, its session's id there, and the verifier's verdict or why none came."""

    server: str
    session_id: str
    verdict: AuditVerdict | str


@dataclass
class HopTrace:
    """One server's session as the client saw it: receipts with the bytes of each step's input and output."""

    peer_id: str
    span: Span
    certificate: ReceiptCertificate
    steps: list[tuple[StepReceipt, list, list]] = field(default_factory=list)


class SessionAudit:
    """What an audited session keeps of its servers' sessions (keyed by their session ids)."""

    def __init__(self) -> None:
        self.traces: dict[str, HopTrace] = {}

    def add_hop(self, hop: Hop, certificate: ReceiptCertificate) -> None:
        self.traces[hop.session_id] = HopTrace(hop.peer_id, hop.span, certificate)

    def record(self, receipt: StepReceipt, inputs: list, outputs: list) -> None:
        """Keeps one step of a hop; RecordError if its receipt is not signed by that hop's certified key."""
        trace = self.traces[receipt.session_id]
        if not receipt.verify(trace.certificate.receipt_key):
            raise RecordError(f"receipt of {receipt.peer_id} is not signed by its certified receipt key")
        trace.steps.append((receipt, inputs, outputs))

    def requests(self, model: str) -> list[tuple[str, AuditRequest, list]]:
        """(server peer id, its audit request, the serialised hidden states) for each server that did steps."""
        return [(trace.peer_id, *audit_request(model, trace)) for trace in self.traces.values() if trace.steps]


def audit_request(model: str, trace: HopTrace) -> tuple[AuditRequest, list]:
    """One hop's trace as an audit request; a hidden state sent twice (an output that was the next input) once.
    The receipts' digests name the bytes: every recorded step was checked against them (``outputs_with_receipts``)."""
    index_of: dict[bytes, int] = {}
    tensors: list = []

    def index(digest: bytes, group: list) -> int:
        if digest not in index_of:
            index_of[digest] = len(index_of)
            tensors.extend(group)
        return index_of[digest]

    steps = tuple(AuditStep(receipt, index(receipt.input_digest, inputs), index(receipt.output_digest, outputs))
                  for receipt, inputs, outputs in trace.steps)
    return AuditRequest(model, trace.certificate, steps, len(index_of)), tensors


def outputs_with_receipts(hops: list[Hop], position: int, sent: list, receipts: tuple[StepReceipt, ...], tensors: list,
                          wire_format: str, audit: SessionAudit | None) -> list:
    """The last hop's output tensors of one step through ``hops``, after checking its receipts against the
    bytes sent and received (and keeping them when the session is audited); RecordError says what is off."""
    groups = codec.hidden_groups(tensors, wire_format)
    check_chain(receipts, tuple(hop.peer_id for hop in hops), tensor_digest(sent),
                tuple(tensor_digest(group) for group in groups))
    for hop, receipt in zip(hops, receipts):
        if receipt.session_id != hop.session_id or receipt.position != position or receipt.span != hop.span:
            raise RecordError(f"receipt of {hop.peer_id} names another session, span or position than the step")
    if audit is not None:
        for index, receipt in enumerate(receipts):
            audit.record(receipt, sent if index == 0 else groups[index - 1], groups[index])
    return groups[-1]
