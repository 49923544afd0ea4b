"""A batch of rows through the swarm: each row is a :class:`~efedllm.client.session.RemoteInferenceSession`
of its own (its own chain sessions, cache length and failover), and a step of several rows sends
every row's step at once, so each server merges them into one pass (:mod:`efedllm.server.batching`).

Call order: ``open``, ``step_rows`` many times, ``close_row`` as rows stop, ``finish``.

:class:`RemoteRowSessions` is the same for rows that join and leave between steps (continuous
batching in a client, as :mod:`efedllm.api.engine` does for concurrent API requests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import torch

from efedllm.client.session import RemoteInferenceSession, SessionHost


class RemoteBatchSession:
    def __init__(self, host: SessionHost, max_lengths: list[int]) -> None:
        self.host = host
        self.sessions = [RemoteInferenceSession(host, max_length) for max_length in max_lengths]
        self._closing: dict[int, object] = {}  # row -> the future of its sessions' close

    def open(self, view_max_age: float) -> None:
        """Opens every row's sessions; a row that cannot open fails the batch (the opened ones are closed by ``finish``)."""
        self.host.run(_together([session.reopen(view_max_age) for session in self.sessions]))

    def step_rows(self, rows: list[int], hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each row's step [1, tokens, hidden] through its chain, all rows at once; their outputs in order."""
        return self.host.run(_together([self.sessions[row].step_async(hidden) for row, hidden in zip(rows, hidden_states)]))

    def close_row(self, row: int) -> None:
        """Frees a stopped row's sessions on the servers now, without waiting for the answer."""
        if row not in self._closing:
            self._closing[row] = self.host.loop.submit(self.sessions[row].finish())

    def finish(self) -> None:
        for row in range(len(self.sessions)):
            self.close_row(row)
        for future in self._closing.values():
            try:
                future.result(timeout=self.host.config.request_timeout)
            except Exception:  # a close that failed leaves the sessions to the servers' idle timeout
                pass


async def _together(coroutines: list) -> list:
    """The coroutines' results, run concurrently on the client's loop (gather must be called there)."""
    return list(await asyncio.gather(*coroutines))


class RemoteRowSessions:
    """Row sessions that come and go. Call order: ``open(max_length)`` (a future of the opened session), ``step``
    with the open sessions of this step, ``close(session)`` when a row ends. Any thread may call them."""

    def __init__(self, host: SessionHost) -> None:
        self.host = host

    def open(self, max_length: int) -> concurrent.futures.Future:
        """Opens a session on a chain covering every block, in the background (failover as ``generate``'s)."""
        session = RemoteInferenceSession(self.host, max_length)
        return self.host.loop.submit(_opened(session, self.host.config.server_view_max_age))

    def step(self, sessions: list[RemoteInferenceSession], hidden_states: list[torch.Tensor]) -> list:
        """Each session's step [1, tokens, hidden], all at once; per session its output, or the exception it raised
        (one row's failure after its retries does not fail the others)."""
        return self.host.run(_together_settled([session.step_async(hidden) for session, hidden in zip(sessions, hidden_states)]))

    def close(self, session: RemoteInferenceSession) -> concurrent.futures.Future:
        """Closes the session's chain in the background (an audited session goes to the verifiers)."""
        return self.host.loop.submit(session.finish())


async def _opened(session: RemoteInferenceSession, view_max_age: float) -> RemoteInferenceSession:
    try:
        await session.reopen(view_max_age)
    except BaseException:
        await session.close()
        raise
    return session


async def _together_settled(coroutines: list) -> list:
    return list(await asyncio.gather(*coroutines, return_exceptions=True))
