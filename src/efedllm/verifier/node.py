"""The verifier node: probes every server through the client's own RPCs and publishes signed verdicts.

Lifecycle: ``Verifier(config)`` does no I/O; ``start()`` loads the trusted reference model (client
parts and all blocks, in float32), joins the DHT and opens the ledger; ``run()`` does rounds
until ``config.rounds`` are done or ``stop()``; ``shutdown()`` releases everything.

One round (:meth:`Verifier.run_round`):

1. discover online servers (``fetch_servers``);
2. draw a WikiText-2 passage (16-128 tokens of prompt plus ``decode_steps`` continuation tokens)
   and run it through the reference, keeping the hidden states at every block boundary for the
   prefill and for each one-token decode step (:func:`reference_trace`);
3. probe each server, in random order with random pauses: a fresh session (uuid4 id), a prefill
   of the hidden states at its first block, then the decode steps — exactly what a client sends,
   so a server cannot tell a probe from a client;
4. compare its outputs with the reference (:func:`~efedllm.models.comparison.compare_outputs`),
   update the sliding window behind ``acc_i``, score and decide activation
   (:func:`~efedllm.verifier.trust.decide_trust`), publish one signed verdict per server;
5. credit the tokens × blocks of passed probes in the ledger and close finished epochs.

Audits (:mod:`efedllm.verifier.audit`): clients send whole sessions of real traffic with their
servers' signed receipts to ``rpc_audit``; the verifier recomputes them and answers a verdict. A
proven lie deactivates the server at once (a verdict is published before the answer) and for good,
and at the next round its unpaid work is forfeited and its credit of the last
``clawback_epochs`` epochs clawed back; a clean audit credits the session's work. Verified work is
the passed probes' and the clean audits'.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from efedllm.common.background import BackgroundLoop
from efedllm.common.dtypes import dtype_name
from efedllm.common.errors import EfedllmError, RecordError
from efedllm.common.spans import Span
from efedllm.dht.evidence import evidence_in, evidence_key, fresh_evidence, probe_order
from efedllm.dht.records import ServerInfo, ServerState
from efedllm.dht.servers import fetch_servers
from efedllm.dht.identity import Identity, start_dht
from efedllm.dht.verdicts import publish_verdict
from efedllm.models.comparison import ProbeComparison, Tolerances, compare_outputs
from efedllm.models.span import load_client_parts, load_span
from efedllm.protocol import codec
from efedllm.protocol.audit import AuditService
from efedllm.protocol.messages import OpenSessionRequest, StepRequest
from efedllm.protocol.service import HopFailure, RemoteSpanStub
from efedllm.verifier.audit import AuditOutcome
from efedllm.verifier.audit_desk import AuditDesk
from efedllm.verifier.config import DEFAULT_PROBE_DECODE_STEPS, SAME_DTYPE_GRADIENT_TOLERANCE, SAME_DTYPE_TOLERANCES, VerifierConfig
from efedllm.verifier.ledger import Ledger, epoch_of
from efedllm.verifier.trust import ProbeWindow, ServerEvidence, TrustDecision, decide_trust

logger = logging.getLogger(__name__)
PROVEN_LIE = "proven lie"  # how a proven lie's deactivation and clawbacks begin their reason
FALLBACK_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    "the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair and, although initially "
    "criticised by some of France's leading artists and intellectuals for its design, it has since become a "
    "global cultural icon of France and one of the most recognisable structures in the world."
)


def default_corpus_path() -> Path:
    """``<project root>/../shared/data/wikitext2-test.raw`` (the project root holds ``src/``)."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "wikitext2-test.raw"


@dataclass(frozen=True)
class VerifierNodeConfig:
    """How a verifier node runs; trust decisions themselves are ``decisions`` (:class:`VerifierConfig`).

    ``rounds`` bounds the rounds ``run()`` does (None: until stopped); a round starts every
    ``decisions.probe_interval_s`` seconds. Each probe is a prefill of ``min_prompt_tokens`` to
    ``max_prompt_tokens`` tokens and ``decode_steps`` one-token steps; probes are ``0..jitter_s``
    seconds apart. Verdicts live ``verdict_ttl_s`` in the DHT (default: the verdict max age).
    ``identity_path``: the verifier's key file (created on first start), so clients' and servers'
    ``--trusted-verifiers`` keys and its trust history survive a restart; None: a new key each start.

    ``decode_steps`` = 8: a fault that strikes a share of steps shows in more of the probes. With 4,
    ``benchmarks/trust.py`` caught ``intermittent:0.1`` in 15 of 20 repetitions within 25 rounds;
    with 8, in all of them.
    """

    model: str = "smollm2-135m"
    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    rounds: int | None = None
    decode_steps: int = DEFAULT_PROBE_DECODE_STEPS
    min_prompt_tokens: int = 16
    max_prompt_tokens: int = 128
    jitter_s: float = 1.0
    request_timeout: float = 30.0
    verdict_ttl_s: float | None = None
    corpus_path: Path | None = None
    seed: int | None = None
    torch_threads: int | None = None  # None: leave the process's torch threads as they are (a library caller's)
    decisions: VerifierConfig = field(default_factory=VerifierConfig)
    identity_path: Path | None = None

    def __post_init__(self) -> None:
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.decode_steps < 0:
            raise ValueError(f"decode_steps must be >= 0, got {self.decode_steps}")
        if not 1 <= self.min_prompt_tokens <= self.max_prompt_tokens:
            raise ValueError(f"need 1 <= min_prompt_tokens <= max_prompt_tokens, got {self.min_prompt_tokens}, "
                             f"{self.max_prompt_tokens}")
        if self.jitter_s < 0 or self.request_timeout <= 0 or (self.torch_threads is not None and self.torch_threads < 1):
            raise ValueError("need jitter_s >= 0, request_timeout > 0 and torch_threads >= 1")
        if self.verdict_ttl_s is not None and self.verdict_ttl_s <= 0:
            raise ValueError(f"verdict_ttl_s must be > 0, got {self.verdict_ttl_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")

    @property
    def ttl(self) -> float:
        return self.verdict_ttl_s or self.decisions.verdict_max_age_s


@dataclass(frozen=True)
class ReferenceTrace:
    """Reference hidden states of one probe: ``steps[s][b]`` is step ``s``'s input of block ``b``
    (``b == num_blocks``: the last block's output), each ``[1, tokens_of_step, hidden]``."""

    steps: tuple[tuple[torch.Tensor, ...], ...]

    @property
    def tokens(self) -> int:
        return sum(step[0].shape[1] for step in self.steps)

    def expected(self, span: Span) -> torch.Tensor:
        return torch.cat([step[span.end] for step in self.steps], dim=1)  # [1, tokens, hidden]


@torch.inference_mode()
def reference_trace(parts, reference, token_ids: torch.Tensor, decode_steps: int) -> ReferenceTrace:
    """Run ``token_ids`` [1, tokens] through every block: a prefill, then ``decode_steps`` single tokens."""
    prompt = token_ids.shape[1] - decode_steps
    if prompt < 1:
        raise ValueError(f"need more than {decode_steps} tokens, got {token_ids.shape[1]}")
    chunks = [token_ids[:, :prompt]] + [token_ids[:, index:index + 1] for index in range(prompt, token_ids.shape[1])]
    cache, position, steps = reference.new_cache(), 0, []
    for chunk in chunks:
        hidden = parts.embed(chunk).float()  # [1, tokens, hidden]
        boundaries = [hidden]
        for block in range(reference.span.start, reference.span.end):
            hidden = reference(hidden, position=position, cache=cache, blocks=Span(block, block + 1))
            boundaries.append(hidden)
        steps.append(tuple(boundaries))
        position += chunk.shape[1]
    return ReferenceTrace(tuple(steps))


class ProbeFailure(EfedllmError, RuntimeError):
    """A server did not answer a probe properly (counts as a failed probe)."""


@dataclass(frozen=True)
class ProbeOutcome:
    peer_id: str
    span: Span
    passed: bool
    tokens: int
    reason: str = ""
    comparison: ProbeComparison | None = None


@dataclass(frozen=True)
class RoundReport:
    round: int
    outcomes: tuple[ProbeOutcome, ...]
    decisions: tuple[TrustDecision, ...]
    probe_bytes: int

    @property
    def inactive(self) -> set[str]:
        return {decision.peer_id for decision in self.decisions if not decision.active}

    def to_json(self) -> dict:
        return {
            "round": self.round,
            "probe_bytes": self.probe_bytes,
            "servers": [
                {"peer_id": outcome.peer_id, "span": str(outcome.span), "passed": outcome.passed, "reason": outcome.reason}
                for outcome in self.outcomes
            ],
            "decisions": [
                {"peer_id": d.peer_id, "score": round(d.score, 4), "active": d.active, "passed": d.passed, "probes": d.probes}
                for d in self.decisions
            ],
        }


class Verifier:
    """A verifier node; see the module docstring for the lifecycle and what a round does."""

    def __init__(self, config: VerifierNodeConfig) -> None:
        self.config = config
        self.window = ProbeWindow(config.decisions.window)
        self.active: dict[str, bool] = {}
        self.scores: dict[str, float] = {}
        self.probe_bytes = 0
        self.rounds_done = 0
        self._evidence_seen: dict[str, float] = {}  # reporter key -> newest of its evidence already acted on
        self.evidence_received = 0
        self._evidence_lookup = None  # the DHT lookup of evidence started last round
        self.parts = self.reference = self.dht = self.p2p = self.ledger = None
        self._random = random.Random(config.seed)
        self._passages: list[str] = []
        self._stopping = threading.Event()
        self.loop = BackgroundLoop("efedllm-verifier-loop")
        self.validator: RSASignatureValidator | None = None
        self.key: str | None = None
        self.proven_liars: dict[str, str] = {}  # peer id -> the proof's description; deactivated for good
        self.audits: AuditDesk | None = None

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> "Verifier":
        if self.config.torch_threads is not None:
            torch.set_num_threads(self.config.torch_threads)
        self.parts = load_client_parts(self.config.model)
        self.reference = load_span(self.config.model, 0, self.parts.config.num_hidden_layers)
        self.audits = AuditDesk(self.config.model, self.reference, self._tolerances_for_dtype, self._act_on_lie,
                                self._gradient_tolerance_for_dtype)
        self._passages = load_passages(self.config.corpus_path or default_corpus_path())
        self.ledger = Ledger(self.config.decisions.ledger_path).open()
        self.proven_liars = self.ledger.deactivations()
        path = self.config.identity_path
        identity = Identity.load_or_create(path) if path is not None else Identity.generate()
        self.validator, self.key = identity.validator, identity.owner_key  # the same key after a restart
        self.dht = start_dht(identity, path, initial_peers=list(self.config.initial_peers) or None,
                             host_maddrs=[f"/ip4/{self.config.host}/tcp/{self.config.port}"])
        self.loop.start()
        self.p2p = self.loop.run(self.dht.replicate_p2p())
        self.loop.run(AuditService().add_p2p_handlers(self.p2p, wrapper=self))
        return self

    def run(self, on_round=None) -> None:
        """Do rounds until ``config.rounds`` are done or ``stop()``; ``on_round(report)`` sees each one."""
        while not self._stopping.is_set():
            started = time.monotonic()
            report = self.run_round()
            if on_round is not None:
                on_round(report)
            if self.config.rounds is not None and self.rounds_done >= self.config.rounds:
                break
            self._stopping.wait(max(0.0, self.config.decisions.probe_interval_s - (time.monotonic() - started)))
        self.close_finished_epochs()

    def stop(self) -> None:
        self._stopping.set()

    def forget_history(self, seed: int | None = None) -> None:
        """Start afresh: empty probe windows, every server active again (benchmarks repeat detection this way)."""
        self.window = ProbeWindow(self.config.decisions.window)
        self.active, self.scores = {}, {}
        self._random = random.Random(seed)

    def shutdown(self) -> None:
        self.loop.shutdown()
        if self.audits is not None:
            self.audits.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    # one round -----------------------------------------------------------------------------
    def prepare_trace(self) -> ReferenceTrace:
        """The reference outputs for the next round's probe (a random passage through the trusted model)."""
        return reference_trace(self.parts, self.reference, self._draw_tokens(), self.config.decode_steps)

    def run_round(self, trace: ReferenceTrace | None = None) -> RoundReport:
        """Probe every online server once (suspects twice) with ``trace`` (default: a fresh one), decide, publish."""
        servers = fetch_servers(self.dht, self.config.model, self.parts.config.num_hidden_layers)
        online = [info for info in servers.values() if info.state is ServerState.ONLINE]
        self._random.shuffle(online)
        online = self._suspects_first(online)
        trace = trace or self.prepare_trace()
        self.book_audits()
        bytes_before = self.probe_bytes
        outcomes = tuple(self.loop.run(self._probe_all(online, trace)))
        for outcome in outcomes:
            self.window.record(outcome.peer_id, outcome.passed)
        decisions = self._decide(online)
        self._publish(decisions)
        self._record_work(outcomes)
        self.rounds_done += 1
        self.close_finished_epochs()
        return RoundReport(self.rounds_done, outcomes, tuple(decisions), self.probe_bytes - bytes_before)

    def _suspects_first(self, online: list[ServerInfo]) -> list[ServerInfo]:
        """Servers named in clients' fresh spot-check evidence get an extra probe, first.

        The DHT lookup started in the previous round is used if it has finished (a lookup of an
        absent key can take seconds; a round never waits for it), and the next one is started.
        """
        pending, self._evidence_lookup = self._evidence_lookup, self.dht.get(
            evidence_key(self.config.model), latest=True, return_future=True)
        if pending is None or not pending.done():
            return online
        try:
            evidence = fresh_evidence(evidence_in(pending.result(timeout=0)), self._evidence_seen)
        except Exception:
            return online
        if not evidence:
            return online
        self.evidence_received += len(evidence)
        by_peer = {info.peer_id: info for info in online}
        return [by_peer[peer] for peer in probe_order(list(by_peer), evidence)]

    def _draw_tokens(self) -> torch.Tensor:
        """Token ids [1, prompt + decode_steps] of a random passage (consecutive lines until long enough)."""
        prompt = self._random.randint(self.config.min_prompt_tokens, self.config.max_prompt_tokens)
        needed = prompt + self.config.decode_steps
        start = self._random.randrange(len(self._passages))
        ids: list[int] = []
        for offset in range(len(self._passages)):
            ids += self.parts.tokenizer(self._passages[(start + offset) % len(self._passages)] + "\n",
                                        add_special_tokens=False)["input_ids"]
            if len(ids) >= needed:
                break
        while len(ids) < needed:  # a tiny corpus: repeat it
            ids += ids
        return torch.tensor([ids[:needed]])

    async def _probe_all(self, servers: list[ServerInfo], trace: ReferenceTrace) -> list[ProbeOutcome]:
        outcomes = []
        for info in servers:
            if self.config.jitter_s > 0:
                await asyncio.sleep(self._random.uniform(0, self.config.jitter_s))
            outcomes.append(await self._probe(info, trace))
        return outcomes

    async def _probe(self, info: ServerInfo, trace: ReferenceTrace) -> ProbeOutcome:
        if info.span.end > self.reference.span.end:
            return ProbeOutcome(info.peer_id, info.span, False, 0, f"span {info.span} exceeds the model")
        try:
            candidate = await self._send_probe(info, trace)
        except ProbeFailure as failure:
            return ProbeOutcome(info.peer_id, info.span, False, 0, str(failure))
        comparison = compare_outputs(trace.expected(info.span), candidate, self._tolerances_for(info))
        return ProbeOutcome(info.peer_id, info.span, comparison.passed, trace.tokens, comparison.reason, comparison)

    def _tolerances_for(self, info: ServerInfo) -> Tolerances:
        """A server that announces the reference's own dtype runs the very same arithmetic, so it is
        held to rounding-level agreement; one in a lower precision gets the calibrated tolerances.
        (Announcing a lower precision buys slack of bfloat16's size, no more.)"""
        return self._tolerances_for_dtype(info.dtype)

    async def _send_probe(self, info: ServerInfo, trace: ReferenceTrace) -> torch.Tensor:
        """The probe, as a client would send it; returns the server's outputs [1, tokens, hidden]."""
        wire_format = "float32" if "float32" in info.wire_formats else info.wire_formats[0]
        session_id, timeout = uuid.uuid4().hex, self.config.request_timeout
        try:
            stub = RemoteSpanStub(self.p2p, info.peer_id)
            await stub.open_session(OpenSessionRequest(session_id, info.span, trace.tokens), timeout)
        except (HopFailure, ValueError) as error:
            raise ProbeFailure(f"cannot open a session: {error}") from None
        outputs, position = [], 0
        try:
            for step in trace.steps:
                tensors = codec.encode_hidden(step[info.span.start], wire_format)
                self.probe_bytes += codec.wire_bytes(tensors)
                answer = await stub.step(StepRequest(session_id, info.span, position, wire_format), tensors, timeout)
                self.probe_bytes += codec.wire_bytes(answer)
                outputs.append(codec.decode_hidden(answer, wire_format, torch.float32))
                position += step[0].shape[1]
        except (HopFailure, RecordError) as error:
            raise ProbeFailure(f"step {len(outputs)} failed: {error}") from None
        finally:
            try:
                await stub.close_session(session_id)
            except HopFailure:
                pass
        return torch.cat(outputs, dim=1)

    # decisions, verdicts, rewards ------------------------------------------------------------
    def _decide(self, servers: list[ServerInfo]) -> list[TrustDecision]:
        evidence = []
        for info in servers:
            passed, probes = self.window.counts(info.peer_id)
            evidence.append(ServerEvidence(info.peer_id, info.span.length, passed, probes,
                                           self.config.decisions.weight(info.peer_id), self.active.get(info.peer_id, True)))
        decisions = [self._proven(decision) for decision in decide_trust(evidence, self.config.decisions.make_policy())]
        self.active.update({decision.peer_id: decision.active for decision in decisions})
        self.scores = {decision.peer_id: decision.score for decision in decisions}
        return decisions

    def _publish(self, decisions: list[TrustDecision]) -> None:
        now = time.time()
        for decision in decisions:
            verdict = decision.to_verdict(self.key, now, self.config.decisions.policy)
            try:
                if not publish_verdict(self.dht, self.validator, self.config.model, verdict, self.config.ttl):
                    logger.warning("no peer accepted the verdict on %s", decision.peer_id)
            except Exception as error:
                logger.warning("publishing the verdict on %s failed: %s", decision.peer_id, error)

    def _record_work(self, outcomes: tuple[ProbeOutcome, ...]) -> None:
        """Passed probes are verified work; closing the epoch pays only servers active by then."""
        epoch = epoch_of(time.time(), self.config.decisions.epoch_seconds)
        for outcome in outcomes:
            if outcome.passed and outcome.peer_id not in self.proven_liars:
                self.ledger.record_work(outcome.peer_id, outcome.tokens, outcome.span.length, epoch)

    # audits of real traffic -----------------------------------------------------------------
    async def rpc_audit(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                        context: P2PContext) -> runtime_pb2.ExpertResponse:
        """One server's session from a client (``efedllm.protocol.audit``): judged, acted on, answered."""
        return codec.response(await self.audits.answer(requests, context.remote_id.to_base58()))

    async def rpc_audit_training(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                                 context: P2PContext) -> runtime_pb2.ExpertResponse:
        """One training request a server answered, from a client (``efedllm.verifier.training_audit``)."""
        return codec.response(await self.audits.answer_training(requests, context.remote_id.to_base58()))

    def _act_on_lie(self, outcome: AuditOutcome) -> None:
        """Deactivates a proven liar for good and publishes that at once."""
        logger.warning("proven lie by %s: %s", outcome.peer_id, outcome.reason)
        self.proven_liars[outcome.peer_id] = f"{PROVEN_LIE}: {outcome.reason}"[:500]
        self.active[outcome.peer_id] = False
        passed, probes = self.window.counts(outcome.peer_id)
        decision = TrustDecision(outcome.peer_id, 0.0, 0.0, False, passed, probes, 0.0, 0.0)
        self._publish([decision])

    def _proven(self, decision: TrustDecision) -> TrustDecision:
        """A proven liar stays inactive with score 0, whatever its probes say."""
        if decision.peer_id not in self.proven_liars:
            return decision
        return dataclasses.replace(decision, score=0.0, active=False)

    def book_audits(self) -> None:
        """In the ledger (this thread's): clean audits' work, and for each proven liar the clawback."""
        epoch = epoch_of(time.time(), self.config.decisions.epoch_seconds)
        for outcome in self.audits.take_judged() if self.audits is not None else []:
            if outcome.verdict == "lie":
                since = max(0, epoch - self.config.decisions.clawback_epochs)
                self.ledger.record_deactivation(outcome.peer_id, self.proven_liars[outcome.peer_id])
                self.ledger.claw_back(outcome.peer_id, since, self.proven_liars[outcome.peer_id])
            elif outcome.verdict == "clean" and outcome.peer_id not in self.proven_liars:
                self.ledger.record_work(outcome.peer_id, outcome.work, outcome.span.length, epoch)

    def _tolerances_for_dtype(self, dtype: str) -> Tolerances:
        if dtype == dtype_name(self.reference.dtype):
            return SAME_DTYPE_TOLERANCES
        return self.config.decisions.tolerances

    def _gradient_tolerance_for_dtype(self, dtype: str) -> float:
        """A server in the reference's dtype runs the same arithmetic (threads reorder sums: ~1e-6); another
        dtype rounds every product, so its gradients are judged ``gradient_tolerance`` loosely."""
        if dtype == dtype_name(self.reference.dtype):
            return SAME_DTYPE_GRADIENT_TOLERANCE
        return self.config.decisions.gradient_tolerance

    def close_finished_epochs(self) -> list:
        """Credit every epoch that has ended and holds work, with the current scores and activation."""
        self.book_audits()
        current = epoch_of(time.time(), self.config.decisions.epoch_seconds)
        active = {peer for peer, is_active in self.active.items() if is_active}
        return [self.ledger.close_epoch(epoch, self.scores, active, self.config.decisions.reward_per_epoch)
                for epoch in self.ledger.pending_epochs(current)]


def load_passages(path: Path) -> list[str]:
    """Paragraphs of a WikiText-style file (headings and blank lines dropped); a built-in one if absent."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        logger.warning("no probe corpus at %s; probing with a built-in paragraph", path)
        return [FALLBACK_TEXT]
    passages = [line.strip() for line in lines if len(line.split()) >= 20 and not line.strip().startswith("=")]
    return passages or [FALLBACK_TEXT]
