"""A batch of rows through the swarm: each row is a :class:`~efedllm.client.session.RemoteInferenceSession`
of its own (its own chain sessions, cache length and failover), and a step of several rows sends
every row's step at once, so each server merges them into one pass (:mod:`efedllm.server.batching`).

Call order: ``open``, ``step_rows`` many times, ``close_row`` as rows stop, ``finish``.
"""

from __future__ import annotations

import asyncio

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
