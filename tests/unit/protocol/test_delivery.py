"""DeliveryServicer's checks, offline: only the awaited step, its last hop's output, its hops' error reports."""

from __future__ import annotations

import asyncio

import pytest

from efedllm.common.errors import RecordError
from efedllm.protocol.delivery import DeliveryServicer
from efedllm.protocol.messages import DeliveredStep, Reply


def test_delivery_checks_the_step_and_its_sender():
    async def scenario():
        servicer = DeliveryServicer()
        servicer.expect("step-1", ("peer-a", "peer-b", "peer-c"))
        servicer._check_sender(DeliveredStep("step-1"), "peer-c")
        servicer._check_sender(DeliveredStep("step-1", Reply.failure("next hop failed", "peer-c")), "peer-b")
        with pytest.raises(RecordError, match="not the chain's last hop"):
            servicer._check_sender(DeliveredStep("step-1"), "peer-b")
        with pytest.raises(RecordError, match="not a hop of its chain"):
            servicer._check_sender(DeliveredStep("step-1", Reply.failure("boom", "peer-a")), "intruder")
        with pytest.raises(RecordError, match="not awaited"):
            servicer._check_sender(DeliveredStep("step-2"), "peer-c")
        servicer.forget("step-1")
        with pytest.raises(RecordError, match="not awaited"):
            servicer._check_sender(DeliveredStep("step-1"), "peer-c")
        servicer.expect("step-3", ("peer-a",))
        with pytest.raises(asyncio.TimeoutError):
            await servicer.wait("step-3", timeout=0.01)

    asyncio.run(scenario())
