"""The distributed client: finds a chain of servers in the DHT and generates through it.

``DistributedModelForCausalLM`` owns the tokenizer, embeddings and LM head, a
:class:`~efedllm.client.swarm_view.SwarmView` of the servers, and the peer machinery every
session shares: a DHT node, a :class:`~efedllm.common.background.BackgroundLoop`, the delivery
endpoint and the open streams to servers. Sessions (:mod:`efedllm.client.session`) run the chains
and fail over; spot checks (:mod:`efedllm.client.spot_check`) run a second chain through
:meth:`DistributedModelForCausalLM.run_chain`.

Lifecycle: the constructor does no I/O; ``start()`` loads the client parts, joins the DHT and waits
until the swarm covers every block; ``shutdown()`` releases everything (also after a failed start).
"""

from __future__ import annotations

import asyncio
import logging
import random
from contextlib import contextmanager

import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator

from efedllm.client.audit import AuditRecord, SessionAudit
from efedllm.client.batch_session import RemoteBatchSession, RemoteRowSessions
from efedllm.client.config import RemoteClientConfig
from efedllm.client.coalesce import CoalescedCalls
from efedllm.client.generation import CausalLMClient
from efedllm.client.routing import RouteHop
from efedllm.client.session import RemoteInferenceSession
from efedllm.client.spot_check import SpotChecker
from efedllm.client.swarm_view import SwarmView
from efedllm.client.training import RemoteSpanRunner, TrainableCausalLM, initial_tensors
from efedllm.client.training_audit import TrainingAuditor
from efedllm.common.background import BackgroundLoop
from efedllm.dht.evidence import publish_evidence
from efedllm.dht.records import SpotCheckEvidence
from efedllm.dht.identity import Identity, peer_id_of_owner, start_dht
from efedllm.models.adapters import AdapterSpec
from efedllm.models.span import ClientParts, load_client_parts
from efedllm.protocol import codec
from efedllm.protocol.audit import AuditVerdict, TrainAuditRequest, submit_audit, submit_training_audit
from efedllm.protocol.channel import ChannelPool
from efedllm.protocol.delivery import DeliveryServicer
from efedllm.protocol.service import STEP_PUSH, STEP_STREAM, RemoteSpanStub

logger = logging.getLogger(__name__)


class DistributedModelForCausalLM(CausalLMClient):
    """A causal LM whose blocks run on a swarm; local parts are tokenizer, embeddings and LM head."""

    def __init__(self, model: str, initial_peers: list[str], config: RemoteClientConfig = RemoteClientConfig()) -> None:
        self.model_name, self.initial_peers, self.config = model, list(initial_peers), config
        self.wire_format = config.resolved_wire_format
        self.parts: ClientParts | None = None
        self.view: SwarmView | None = None
        self.spot_checker: SpotChecker | None = None
        self.dht: DHT | None = None
        self.validator: RSASignatureValidator | None = None
        self.client_key = self.peer_id = None
        self.p2p = self.delivery = self.steps = self.pushes = None
        self.loop = BackgroundLoop("efedllm-client-loop")
        self.bytes_sent = self.bytes_received = 0  # hidden states of steps (received: with receipts' extra outputs)
        self._stubs: dict[str, RemoteSpanStub] = {}
        self._audit_random = random.Random(config.audit_seed)
        self._audits_pending: set = set()
        self._audit_locks: dict[str, asyncio.Lock] = {}  # verifier peer id -> one audit at a time
        self.audits: list[AuditRecord] = []  # in the order the verdicts came
        self.audit_bytes = 0

    @classmethod
    def from_pretrained(cls, model: str, initial_peers: list[str], config: RemoteClientConfig = RemoteClientConfig()):
        instance = cls(model, initial_peers, config)
        try:
            instance.start()
        except BaseException:
            instance.shutdown()
            raise
        return instance

    # lifecycle -----------------------------------------------------------------------------
    def start(self, wait_for_coverage: bool = True) -> None:
        """Joins the swarm; unless ``wait_for_coverage`` is False (an API that must answer 503 while blocks are
        missing), waits up to ``discovery_timeout`` until its servers cover every block."""
        self.parts = load_client_parts(self.model_name, self.config.dtype)
        self.head = CoalescedCalls(self.parts.logits)  # concurrent generate() threads: one LM-head matmul
        identity = Identity.generate()  # a client is a new peer every start: nothing ties its sessions together
        self.validator, self.client_key = identity.validator, identity.owner_key
        self.dht = start_dht(identity, initial_peers=self.initial_peers, client_mode=True)
        self.view = SwarmView(self.dht, self.model_name, self.parts.config.num_hidden_layers, self.config)
        self.spot_checker = SpotChecker(self.config.verify_fraction, self.config.spot_check_seed, self.view,
                                        self.run_chain, self.report_evidence, self.client_key)
        self.loop.start()
        self.p2p = self.run(self.dht.replicate_p2p())
        self.peer_id = self.p2p.peer_id.to_base58()
        self.delivery = DeliveryServicer()
        self.run(self.delivery.start(self.p2p))
        self.steps, self.pushes = ChannelPool(self.p2p, STEP_STREAM), ChannelPool(self.p2p, STEP_PUSH)
        if wait_for_coverage:
            self.view.wait_for_coverage(self.config.discovery_timeout)
        else:
            self.view.refresh()
        if self.config.refresh_view_in_background and self.config.server_view_max_age > 0:
            self.loop.submit(self.view.refresh_periodically(0.8 * self.config.server_view_max_age))

    def shutdown(self) -> None:
        if self.loop.running:
            if self.delivery is not None:
                self.run(self.delivery.shutdown())
            if self.steps is not None:
                self.run(_close_streams(self.steps, self.pushes))
            self.loop.shutdown()  # also cancels the background refresh
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    def run(self, coroutine):
        """Runs ``coroutine`` on the client's event loop and returns its result."""
        return self.loop.run(coroutine)

    # what sessions use -----------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.parts.dtype

    def stub(self, peer_id: str) -> RemoteSpanStub:
        if peer_id not in self._stubs:
            self._stubs[peer_id] = RemoteSpanStub(self.p2p, peer_id, self.steps, self.pushes)
        return self._stubs[peer_id]

    def encode(self, hidden_states: torch.Tensor, wire_format: str) -> list:
        """The hidden states as sent, counted in ``bytes_sent``."""
        tensors = codec.encode_hidden(hidden_states, wire_format)
        self.bytes_sent += codec.wire_bytes(tensors)
        return tensors

    async def run_chain(self, route: list[RouteHop], inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` [1, T, H] as one prefill through a fresh session on ``route``; its output [1, T, H]."""
        session = RemoteInferenceSession(self, max_length=inputs.shape[1], audited=False)
        try:
            await session.open_route(route)
            return await session.forward(inputs, 0)
        finally:
            await session.close()

    async def probe(self, hop: RouteHop) -> None:
        """Measures one server for this client's view: a session opened on its whole span (its round trip) and
        one relayed decode step of a real token's embedding (its step time). What routing and the monitor show
        is then measured here, not what the server claims."""
        session = RemoteInferenceSession(self, max_length=1, audited=False)
        try:
            await session.open_route([hop])
            token = torch.tensor([[self.parts.tokenizer.eos_token_id or 0]])
            await session.forward(self.parts.embed(token), 0, relay=True)
        finally:
            await session.close()

    def trainable(self, spec: AdapterSpec, tensors: dict[str, torch.Tensor] | None = None, seed: int = 0,
                  attempts: int = 3, route: list[RouteHop] | None = None) -> TrainableCausalLM:
        """A model to fine-tune through the swarm (:mod:`efedllm.client.training`): one runner per server of a
        chain covering every block (``route``, or the best chain); ``tensors`` an adapter to go on from
        (default: fresh, seeded)."""
        route = route or self.view.find_route(self.view.banned)
        auditor = TrainingAuditor(self.model_name, self.config.train_audit_fraction, self.config.audit_seed) \
            if self.config.audits_training else None
        runners = [RemoteSpanRunner(self, hop.blocks, hop.peer_id, spec, attempts, self.config.request_timeout, auditor)
                   for hop in route]
        return TrainableCausalLM(self.parts, runners, spec, initial_tensors(self.parts, spec, tensors, seed),
                                 torch.Generator().manual_seed(seed + 1), (tensors or {}).get("prompts"))

    def row_sessions(self) -> RemoteRowSessions:
        """Sessions for rows that join and leave between steps (:class:`~efedllm.client.batch_session.RemoteRowSessions`)."""
        return RemoteRowSessions(self)

    def draw_audit(self) -> bool:
        """Whether the next session is audited (a private draw with probability ``config.audit_fraction``)."""
        return self._audit_random.random() < self.config.audit_fraction

    def submit_audit(self, audit: SessionAudit) -> None:
        """Sends an audited session's servers' sessions to trusted verifiers, in the background."""
        future = self.loop.submit(self._submit_audit(audit))
        self._audits_pending.add(future)
        future.add_done_callback(self._audits_pending.discard)

    async def _submit_audit(self, audit: SessionAudit) -> None:
        verifiers = sorted(peer_id_of_owner(key) for key in self.config.trusted_verifier_keys)
        for server, request, tensors in audit.requests(self.model_name):
            verifier = self._audit_random.choice(verifiers)
            self.audit_bytes += codec.wire_bytes(tensors) + len(codec.pack_metadata(request.to_wire()))
            verdict = await self._send_audit(server, verifier, request, tensors)
            self.audits.append(AuditRecord(server, request.steps[0].receipt.session_id, verdict))

    def audit_training(self, request: TrainAuditRequest, tensors: list) -> AuditVerdict | str:
        """A trusted verifier's verdict on one training answer (blocks), or why none came."""
        verifier = self._audit_random.choice(sorted(peer_id_of_owner(key) for key in self.config.trusted_verifier_keys))
        self.audit_bytes += codec.wire_bytes(tensors) + len(codec.pack_metadata(request.to_wire()))
        verdict = self.run(self._send_audit(request.receipt.peer_id, verifier, request, tensors,
                                            submit=submit_training_audit))
        self.audits.append(AuditRecord(request.receipt.peer_id, "training", verdict))
        return verdict

    async def _send_audit(self, server: str, verifier: str, request, tensors, attempts: int = 2,
                          submit=None) -> AuditVerdict | str:
        """The verifier's verdict, or why none came. A verifier judges one audit per peer at a time and refuses
        the others, so this client's audits to it wait for each other. A second attempt after a transport
        error: judging again is harmless."""
        lock = self._audit_locks.setdefault(verifier, asyncio.Lock())
        for attempt in range(attempts):
            try:
                async with lock:
                    return await (submit or submit_audit)(self.p2p, verifier, request, tensors)
            except Exception as error:  # a verifier out of reach must not end the client's work
                logger.warning("audit of %s by %s failed (attempt %d): %r", server, verifier, attempt + 1, error)
                failure = f"{type(error).__name__}: {error}"
        return failure

    def wait_for_audits(self, timeout: float = 120.0) -> None:
        """Blocks until the audits submitted so far have been answered (or failed)."""
        pending = list(self._audits_pending)
        if pending:
            self.run(_wait_for(pending, timeout))

    def report_evidence(self, evidence: SpotCheckEvidence) -> bool:
        """Publish spot-check evidence (signed with this client's key) for the verifiers."""
        try:
            return publish_evidence(self.dht, self.validator, self.model_name, evidence)
        except Exception as error:
            logger.warning("could not publish spot-check evidence: %s", error)
            return False

    # sessions ------------------------------------------------------------------------------
    @contextmanager
    def inference_session(self, max_length: int):
        session = RemoteInferenceSession(self, max_length)
        self.run(session.reopen(self.config.server_view_max_age))
        try:
            yield session
        finally:
            self.run(session.finish())

    @contextmanager
    def batch_session(self, max_lengths: list[int]):
        session = RemoteBatchSession(self, max_lengths)
        try:
            session.open(self.config.server_view_max_age)
            yield session
        finally:
            session.finish()


async def _wait_for(futures: list, timeout: float) -> None:
    """Waits on the client's loop for concurrent futures of coroutines running on it (wrapped here, on that loop)."""
    await asyncio.wait([asyncio.wrap_future(future) for future in futures], timeout=timeout)


async def _close_streams(*pools: ChannelPool) -> None:
    for pool in pools:
        pool.close_all()  # on the event loop: it closes stream writers and cancels their readers
