"""What the HTTP routes call: the swarm client, the engine and the monitor behind one object.

Lifecycle: the constructor does no I/O; ``start()`` joins the swarm (a
:class:`~efedllm.client.remote.DistributedModelForCausalLM`), starts the
:class:`~efedllm.api.engine.GenerationEngine` and the monitor's probes; ``shutdown()`` undoes it.
Per request: ``check_model``, ``encode`` (prompt token rows and each choice's config, the context
checked), ``check_coverage`` (a 503 naming missing blocks before anything is queued), ``submit``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from efedllm.api.config import ApiConfig
from efedllm.api.engine import EngineFull, Event, GenerationEngine, Job
from efedllm.api.metrics import ApiMetrics
from efedllm.api.monitor import block_hosts, probe_servers_periodically, read_balances, swarm_snapshot
from efedllm.api.requests import ApiError, CompletionRequest
from efedllm.client.remote import DistributedModelForCausalLM
from efedllm.client.routing import MissingBlocksError
from efedllm.dht.verdicts import fetch_verdicts

logger = logging.getLogger(__name__)


class ApiService:
    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self.model: DistributedModelForCausalLM | None = None
        self.engine: GenerationEngine | None = None
        self.metrics = ApiMetrics()
        self.started_at = time.time()
        self._probes = None

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.model = DistributedModelForCausalLM(self.config.model, list(self.config.initial_peers), self.config.client)
        self.model.start(wait_for_coverage=False)  # missing blocks are a 503 per request, not a failed start
        self.engine = GenerationEngine(self.model.parts, self.model.row_sessions(), self.model.eos_token_ids(),
                                       self.config.max_rows, self.config.max_pending, self.metrics.observe_step).start()
        self.metrics.watch_engine(self.engine)
        if self.config.probe_interval > 0:
            self._probes = self.model.loop.submit(probe_servers_periodically(self.model, self.config.probe_interval))

    def shutdown(self) -> None:
        if self._probes is not None:
            self._probes.cancel()
        if self.engine is not None:
            self.engine.shutdown()
        if self.model is not None:
            self.model.shutdown()

    # per request ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.model.parts.config.num_hidden_layers

    @property
    def context_limit(self) -> int:
        limit = getattr(self.model.parts.config, "max_position_embeddings", None) or 2048
        return min(limit, self.config.max_context or limit)

    def check_model(self, name: str) -> None:
        if name != self.config.model:
            raise ApiError(404, f"the model {name!r} does not exist here; this swarm serves {self.config.model!r}",
                           param="model", code="model_not_found")

    def encode(self, request: CompletionRequest) -> tuple[list[torch.Tensor], list[int]]:
        """Per prompt its token ids [1, tokens] and the tokens its choices may generate; 400 past the context."""
        rows = [self._encode_one(prompt, request.chat) for prompt in request.prompts]
        budgets = []
        for row in rows:
            room = self.context_limit - row.shape[1]
            wanted = request.max_tokens or min(self.config.default_max_tokens, room)
            if room < 1 or wanted > room:
                raise ApiError(400, f"this model's context is {self.context_limit} tokens; the prompt has {row.shape[1]} and "
                               f"{wanted} more were asked for", param="messages" if request.chat else "prompt",
                               code="context_length_exceeded")
            budgets.append(wanted)
        return rows, budgets

    def _encode_one(self, prompt, chat: bool) -> torch.Tensor:
        try:
            if chat:
                return self.model.encode_messages(list(prompt))
            if isinstance(prompt, str):
                return self.model.encode_prompt(prompt, chat=False)
        except ValueError as error:  # the prompt encodes to no tokens
            raise ApiError(400, str(error), param="messages" if chat else "prompt") from None
        vocab = self.model.parts.lm_head_weight.shape[0]
        if not prompt:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt")
        if max(prompt) >= vocab:
            raise ApiError(400, f"token id {max(prompt)} is outside the vocabulary of {vocab}", param="prompt")
        return torch.tensor([list(prompt)], dtype=torch.long)

    def check_coverage(self) -> None:
        """A 503 naming the blocks no usable server hosts (read from the DHT at most ``server_view_max_age`` ago)."""
        view = self.model.view
        view.refresh(self.config.client.server_view_max_age)
        try:
            view.find_route(view.banned)
        except MissingBlocksError as error:
            self.metrics.rejected("missing_blocks")
            raise ApiError(503, f"the swarm cannot serve {self.config.model} now: {error}", type="service_unavailable",
                           code="blocks_missing") from None

    def submit(self, request: CompletionRequest, rows: list[torch.Tensor], budgets: list[int],
               loop: asyncio.AbstractEventLoop) -> tuple[Job, asyncio.Queue]:
        """Queues the request's choices (``n`` per prompt, prompt-major); its events arrive on the returned queue."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        prompts, configs = [], []
        for row, budget in zip(rows, budgets):
            for choice in range(request.n):
                prompts.append(row)
                configs.append(request.generation_config(choice, budget))
        job = Job(prompts, configs, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        try:
            self.engine.submit(job)
        except EngineFull as error:
            self.metrics.rejected("busy")
            raise ApiError(429, str(error), type="rate_limit_error", code="busy") from None
        except ValueError as error:
            raise ApiError(400, str(error), param="n") from None
        return job, queue

    # what the monitor and /v1/models show -------------------------------------------------------
    def coverage(self) -> tuple[int, int]:
        """(blocks some usable server hosts: online, not deactivated by a verifier; all blocks), from the client's view."""
        view = self.model.view
        view.refresh(self.config.client.server_view_max_age)
        hosts = block_hosts(self.num_blocks, view.servers, view.deactivated_peers())
        return sum(bool(peers) for peers in hosts), self.num_blocks

    def snapshot(self) -> dict:
        view = self.model.view
        view.refresh(2.0)
        verdicts = fetch_verdicts(self.model.dht, self.config.model, view.servers.keys(), timeout=5.0)
        balances = read_balances(self.config.ledger_path)
        return swarm_snapshot(self.config.model, self.num_blocks, view.servers, dict(view.rtt), dict(view.step_seconds),
                              view.deactivated_peers(), view.banned, verdicts, set(self.config.client.trusted_verifier_keys),
                              balances, self.engine.stats())
