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
import random
import time
import uuid

import torch

from efedllm import wire
from efedllm.client.routing import MissingBlocksError, RouteHop
from efedllm.records import Hop, OpenSessionRequest, RecordError, SpotCheckEvidence, StepRequest


def draw_spot_check(generator: random.Random, fraction: float) -> bool:
    """Whether this step is checked: probability ``fraction``; pure given the generator."""
    return fraction > 0 and generator.random() < fraction


def alternative_route(find_route, primary: list[RouteHop]) -> list[RouteHop] | None:
    """A chain avoiding every server of ``primary`` (``find_route(excluded)`` routes), or None."""
    try:
        return find_route({hop.peer_id for hop in primary})
    except MissingBlocksError:
        return None


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
        model.spot_checks_skipped += 1
        return None
    try:
        alternative = await _run_chain(model, route, inputs)
    except (HopFailure, RecordError):
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
    """``inputs`` [1, T, H] as one prefill through a fresh chain; its output [1, T, H]."""
    session_ids = [uuid.uuid4().hex for _ in route]
    max_length = inputs.shape[1]
    timeout = model.config.request_timeout
    try:
        await asyncio.gather(*(
            model.stub(hop.peer_id).call("rpc_open_session", OpenSessionRequest(session_id, hop.blocks, max_length).to_wire(),
                                         timeout=timeout)
            for hop, session_id in zip(route, session_ids)
        ))
        hops = [Hop(hop.peer_id, hop.blocks, session_id) for hop, session_id in zip(route, session_ids)]
        request = StepRequest(hops[0].session_id, hops[0].span, 0, model.wire_format, tuple(hops[1:]))
        answer = await model.stub(hops[0].peer_id).call("rpc_step", request.to_wire(),
                                                        wire.encode_hidden(inputs, model.wire_format), timeout)
        return wire.decode_hidden(answer.tensors, model.wire_format, model.parts.dtype)
    finally:
        await asyncio.gather(*(
            model.stub(hop.peer_id).call("rpc_close_session", {"session_id": session_id}, timeout=5.0)
            for hop, session_id in zip(route, session_ids)
        ), return_exceptions=True)
