"""Where a verifier receives audits (``rpc_audit``): one in flight per requester, judged off the event loop.

Call order: ``AuditDesk(model, reference, tolerances_for, on_lie, gradient_tolerance_for)`` does no I/O;
``answer(requests, requester)`` (a session, :mod:`~efedllm.verifier.audit`) or ``answer_training(requests,
requester)`` (a training request, :mod:`~efedllm.verifier.training_audit`) on the verifier's event loop reads
one audit, judges it on the desk's own thread
(:func:`~efedllm.verifier.audit.judge_audit`), calls ``on_lie`` (on a worker thread) before it
answers a lie, and queues the outcome; ``take_judged()`` hands the queued outcomes to the thread
that owns the ledger; ``shutdown()`` stops the judging thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
from typing import AsyncIterator, Callable

from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.models.comparison import Tolerances
from efedllm.protocol.audit import AuditRequest, AuditVerdict, TrainAuditRequest, discard_audit, read_audit
from efedllm.verifier.audit import AuditOutcome, judge_audit
from efedllm.verifier.config import SAME_DTYPE_GRADIENT_TOLERANCE
from efedllm.verifier.training_audit import TrainingJudge

logger = logging.getLogger(__name__)
MAX_REASON = 4096  # AuditVerdict.reason's limit


class AuditDesk:
    """Judges clients' audits for one model against ``reference`` (every block, float32)."""

    def __init__(self, model: str, reference, tolerances_for: Callable[[str], Tolerances],
                 on_lie: Callable[[AuditOutcome], None], gradient_tolerance_for: Callable[[str], float] = lambda _: SAME_DTYPE_GRADIENT_TOLERANCE) -> None:
        self.model, self.reference = model, reference
        self.training = TrainingJudge(reference, tolerances_for, gradient_tolerance_for)
        self.tolerances_for, self.on_lie = tolerances_for, on_lie
        self.outcomes: list[AuditOutcome] = []  # every judged audit, in order
        self._judged: queue.SimpleQueue = queue.SimpleQueue()  # judged on the loop, booked by the ledger's thread
        self._in_flight: set[str] = set()  # requesters with an audit in flight: one each, so nobody floods the desk
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")

    async def answer(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], requester: str) -> AuditVerdict:
        """The verdict on one server's session."""
        return await self._answer(requests, requester, AuditRequest, self._judge_session)

    async def answer_training(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], requester: str) -> AuditVerdict:
        """The verdict on one training request a server answered."""
        return await self._answer(requests, requester, TrainAuditRequest, self.training.judge)

    async def _answer(self, requests, requester: str, kind: type, judge) -> AuditVerdict:
        if requester in self._in_flight:
            await discard_audit(requests)  # refuse after reading: an early close breaks the sender's pipe
            return AuditVerdict("invalid", "one audit at a time per peer")
        self._in_flight.add(requester)
        try:
            outcome = await self._judge(requests, kind, judge)
        finally:
            self._in_flight.discard(requester)
        return AuditVerdict(outcome.verdict, outcome.reason[:MAX_REASON], outcome.step)

    def _judge_session(self, request: AuditRequest, tensors: list) -> AuditOutcome:
        return judge_audit(request, tensors, self.reference, self.tolerances_for)

    async def _judge(self, requests, kind: type, judge) -> AuditOutcome:
        loop = asyncio.get_running_loop()
        try:
            request, tensors = await read_audit(requests, kind)
            if request.model != self.model:
                raise RecordError(f"this verifier audits {self.model}, not {request.model}")
            outcome = await loop.run_in_executor(self._executor, judge, request, tensors)
        except RecordError as error:
            return AuditOutcome("", None, "invalid", str(error))
        except Exception as error:  # a bug must not end the verifier's other work
            logger.exception("an audit failed")
            return AuditOutcome("", None, "invalid", f"{type(error).__name__}: {error}")
        self.outcomes.append(outcome)
        logger.info("audit of %s: %s %s", outcome.peer_id, outcome.verdict, outcome.reason)
        if outcome.verdict == "lie":
            await loop.run_in_executor(None, self.on_lie, outcome)  # published before the client hears the verdict
        self._judged.put(outcome)
        return outcome

    def take_judged(self) -> list[AuditOutcome]:
        """The outcomes judged since the last call, oldest first."""
        outcomes = []
        while not self._judged.empty():
            outcomes.append(self._judged.get())
        return outcomes

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
