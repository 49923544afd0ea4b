"""Client spot checks (``RemoteClientConfig.verify_fraction``): a fraction p of a session's steps is
also run through a second chain that shares no server with the first, and the two outputs compared.

A chained step shows the client only the last server's output, so the check covers whole chains:
the second chain gets the session's inputs so far in one prefill (it has no cache for them) and
its outputs for the step's tokens are compared with the first chain's, with the verifiers'
default tolerances (which accept honest servers in another dtype). A mismatch names every server
of both chains as suspects and is published in the DHT as signed evidence
(:mod:`efedllm.dht.evidence`); verifiers probe suspects first. The generation itself goes on
with the first chain's output: evidence decides nothing by itself.

Call order: a session asks :meth:`SpotChecker.draw` after each step and, when it says yes, awaits
:meth:`SpotChecker.check`. The checker runs the second chain through ``run_chain(route, inputs)``
(the client's public :meth:`~efedllm.client.remote.DistributedModelForCausalLM.run_chain`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable

import torch

from efedllm.client.routing import RouteHop
from efedllm.client.swarm_view import SwarmView
from efedllm.common.errors import RecordError
from efedllm.dht.records import SpotCheckEvidence
from efedllm.models.comparison import DEFAULT_TOLERANCES, ProbeComparison, compare_outputs
from efedllm.protocol.service import HopFailure

logger = logging.getLogger(__name__)
RunChain = Callable[[list[RouteHop], torch.Tensor], Awaitable[torch.Tensor]]


def draw_spot_check(generator: random.Random, fraction: float) -> bool:
    """Whether this step is checked: probability ``fraction``; pure given the generator."""
    return fraction > 0 and generator.random() < fraction


def mismatch_evidence(primary: list[RouteHop], alternative: list[RouteHop], comparison: ProbeComparison, tokens: int,
                      reporter_key: str) -> SpotCheckEvidence:
    suspects = tuple(dict.fromkeys(hop.peer_id for hop in primary + alternative))
    return SpotCheckEvidence(suspects, tokens, float(comparison.min_cosine), float(comparison.max_relative_l2),
                             time.time(), reporter_key)


class SpotChecker:
    """Draws which steps are checked, runs the checks and counts them; the constructor does no I/O.

    ``report(evidence)`` publishes a mismatch (it blocks: it runs in an executor) and returns
    whether the DHT took it; ``reporter_key`` names this client in the evidence.
    """

    def __init__(self, fraction: float, seed: int | None, view: SwarmView, run_chain: RunChain,
                 report: Callable[[SpotCheckEvidence], bool], reporter_key: str) -> None:
        self.fraction, self.view, self.run_chain, self.report, self.reporter_key = fraction, view, run_chain, report, reporter_key
        self._random = random.Random(seed)
        self.checks = self.skipped = 0
        self.evidence: list[SpotCheckEvidence] = []  # what this client reported

    def draw(self) -> bool:
        return draw_spot_check(self._random, self.fraction)

    async def check(self, primary: list[RouteHop], inputs: torch.Tensor, outputs: torch.Tensor) -> ProbeComparison | None:
        """Check ``outputs`` [1, t, H] (the primary chain's, for the last t of ``inputs`` [1, T, H]).

        Returns the comparison, or None when no disjoint chain exists or it failed (counted as skipped).
        """
        route = self.view.disjoint_route(primary, inputs.shape[1])
        if route is None:
            logger.info("spot check skipped: no chain avoids %s among %s", [hop.peer_id for hop in primary],
                        self.view.describe())
            self.skipped += 1
            return None
        try:
            alternative = (await self.run_chain(route, inputs))[:, -outputs.shape[1]:]
        except (HopFailure, RecordError) as error:
            logger.info("spot check skipped: the second chain failed: %s", error)
            self.skipped += 1
            return None
        try:
            comparison = compare_outputs(outputs.float(), alternative.float(), DEFAULT_TOLERANCES)
        except ValueError as error:  # the primary chain's output itself is not finite
            comparison = ProbeComparison(-1.0, float("inf"), 1.0, False, f"primary chain output: {error}")
        self.checks += 1
        if not comparison.passed:
            evidence = mismatch_evidence(primary, route, comparison, int(outputs.shape[1]), self.reporter_key)
            self.evidence.append(evidence)
            await asyncio.get_running_loop().run_in_executor(None, self.report, evidence)
        return comparison
