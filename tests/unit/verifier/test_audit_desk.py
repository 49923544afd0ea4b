"""The audit desk: one audit in flight per requester, refusals answered after reading, bad audits invalid."""

from __future__ import annotations

import asyncio

from hivemind.proto import runtime_pb2

from efedllm.verifier.audit_desk import AuditDesk


def _desk(lies: list) -> AuditDesk:
    return AuditDesk("smollm2-135m", reference=None, tolerances_for=lambda dtype: None, on_lie=lies.append)


async def _messages(held: asyncio.Event | None = None, read: list | None = None, count: int = 3):
    for index in range(count):
        if held is not None and index == 1:
            await held.wait()  # the sender is still streaming
        if read is not None:
            read.append(index)
        yield runtime_pb2.ExpertRequest(uid="", metadata=b"\xc1" if index == 0 else b"")  # not msgpack


def test_a_second_audit_of_one_peer_is_refused_after_being_read_and_others_go_on():
    async def scenario():
        lies, held, read = [], asyncio.Event(), []
        desk = _desk(lies)
        first = asyncio.create_task(desk.answer(_messages(held), "peer-a"))
        await asyncio.sleep(0.05)
        refused = await desk.answer(_messages(read=read), "peer-a")
        other = asyncio.create_task(desk.answer(_messages(), "peer-b"))
        held.set()
        answers = await first, await other
        desk.shutdown()
        return refused, read, answers, lies, desk

    refused, read, (first, other), lies, desk = asyncio.run(scenario())
    assert (refused.verdict, refused.reason) == ("invalid", "one audit at a time per peer")
    assert read == [0, 1, 2]  # the refused stream was read to its end before the answer
    for answer in (first, other):
        assert (answer.verdict, answer.reason.split(":")[0]) == ("invalid", "metadata is not valid msgpack")
    assert lies == [] and desk.take_judged() == []  # malformed audits prove nothing and book nothing


def test_after_an_answer_the_same_peer_may_audit_again():
    async def scenario():
        desk = _desk([])
        answers = [await desk.answer(_messages(), "peer-a") for _ in range(2)]
        desk.shutdown()
        return answers

    assert [answer.reason.split(":")[0] for answer in asyncio.run(scenario())] == ["metadata is not valid msgpack"] * 2
