"""Client spot checks (``RemoteClientConfig.verify_fraction``): a fraction p of a session's steps is
also run through a second chain that shares no server with the first, and the two outputs compared.

A chained step shows the client only the last server's output, so the check covers whole chains:
the second chain gets the session's inputs so far in one prefill (it has no cache for them) and
its outputs for the step's tokens are compared with the first chain's, with the verifiers'
default tolerances (which accept honest servers in another dtype). A mismatch names every server
of both chains as suspects and is published in the DHT as signed evidence
(:mod:`efedllm.verifier.evidence`); verifiers probe suspects first. The generation itself goes on
with the first chain's output: evidence decides nothing by itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import torch

from efedllm.client.routing import RouteHop, alternative_route
from efedllm.records import RecordError, SpotCheckEvidence

logger = logging.getLogger(__name__)


def draw_spot_check(generator: random.Random, fraction: float) -> bool:
    """Whether this step is checked: probability ``fraction``; pure given the generator."""
    return fraction > 0 and generator.random() < fraction


def mismatch_evidence(primary: list[RouteHop], alternative: list[RouteHop], comparison, tokens: int,
                      reporter_key: str) -> SpotCheckEvidence:
    suspects = tuple(dict.fromkeys(hop.peer_id for hop in primary + alternative))
    return SpotCheckEvidence(suspects, tokens, float(comparison.min_cosine), float(comparison.max_relative_l2),
                             time.time(), reporter_key)


async def run_spot_check(model, primary: list[RouteHop], inputs: torch.Tensor, outputs: torch.Tensor):
    """Check ``outputs`` [1, t, H] (the primary chain's, for the last t of ``inputs`` [1, T, H]).

    Returns the comparison, or None when no disjoint chain exists or it failed (counted as skipped).
    """
    from efedllm.client.remote import HopFailure
    from efedllm.verifier.comparison import DEFAULT_TOLERANCES, ProbeComparison, compare_outputs

    route = alternative_route(lambda excluded: model.find_route(excluded | model.banned, inputs.shape[1]), primary)
    if route is None:
        logger.info("spot check skipped: no chain avoids %s among %s", [hop.peer_id for hop in primary],
                    {peer: (info.state.value, str(info.span), info.free_cache_tokens) for peer, info in model.servers.items()})
        model.spot_checks_skipped += 1
        return None
    try:
        alternative = await _run_chain(model, route, inputs)
    except (HopFailure, RecordError) as error:
        logger.info("spot check skipped: the second chain failed: %s", error)
        model.spot_checks_skipped += 1
        return None
    alternative = alternative[:, -outputs.shape[1]:]
    try:
        comparison = compare_outputs(outputs.float(), alternative.float(), DEFAULT_TOLERANCES)
    except ValueError as error:  # the primary chain's output itself is not finite
        comparison = ProbeComparison(-1.0, float("inf"), 1.0, False, f"primary chain output: {error}")
    model.spot_checks += 1
    if not comparison.passed:
        evidence = mismatch_evidence(primary, route, comparison, int(outputs.shape[1]), model.client_key)
        model.spot_check_evidence.append(evidence)
        await asyncio.get_running_loop().run_in_executor(None, model.report_evidence, evidence)
    return comparison


async def _run_chain(model, route: list[RouteHop], inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` [1, T, H] as one prefill through a fresh session on ``route``; its output [1, T, H]."""
    from efedllm.client.remote import RemoteInferenceSession

    session = RemoteInferenceSession(model, max_length=inputs.shape[1])
    try:
        await session.open_route(route)
        return await session._send(inputs, 0)
    finally:
        await session.close()
