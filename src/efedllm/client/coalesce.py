"""One client, many generations: their LM-head calls merged into one matmul.

Reading the LM head's weights costs a token as much as a third of the whole model's blocks (SmolLM2-135M:
49152 x 576 floats, about 12 ms on one core) whether it produces one row of logits or thirty-two. Threads of
one process that each run a generation (one session each, e.g. one per user of an application) call it once
per token each; :class:`CoalescedCalls` runs the calls that are waiting as one batched call ("flat
combining"): the first caller to find no call running becomes the leader, takes every waiting input, runs
them together and hands each caller its rows; callers arriving meanwhile wait for the next leader. A lone
caller runs at once: no timer, no batching delay.

Call order: ``calls(rows)`` from any thread -> the wrapped function on ``torch.cat`` of the waiting inputs
(same shape but the first dimension; others run on their own) -> each caller gets its slice, or the
exception the batched call raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class _Call:
    inputs: torch.Tensor
    outputs: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = self.inputs.shape[0]


class CoalescedCalls:
    """``function`` [rows, ...] -> [rows, ...] shared by threads; waiting calls run as one (at most
    ``max_rows`` rows a call)."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], max_rows: int = 64) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.function, self.max_rows = function, max_rows
        self._ready = threading.Condition()
        self._waiting: list[_Call] = []
        self._running = False
        self.batches = self.calls = 0  # batched calls made / calls served: their ratio is the merging achieved

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        call = _Call(inputs)
        with self._ready:
            self._waiting.append(call)
            while not call.done:
                if self._running:
                    self._ready.wait()
                    continue
                self._running = True
                taken = self._take()
                self._ready.release()
                try:
                    self._run(taken)
                finally:
                    self._ready.acquire()
                    self._running = False
                    self._ready.notify_all()
        if call.error is not None:
            raise call.error
        return call.outputs

    def _take(self) -> list[_Call]:
        """The waiting calls that fit one batch with the first: same trailing shape and dtype, ``max_rows``."""
        first, taken, rows = self._waiting[0], [], 0
        for call in list(self._waiting):
            compatible = call.inputs.shape[1:] == first.inputs.shape[1:] and call.inputs.dtype == first.inputs.dtype
            if compatible and (not taken or rows + call.rows <= self.max_rows):
                taken.append(call)
                rows += call.rows
                self._waiting.remove(call)
        return taken

    def _run(self, taken: list[_Call]) -> None:
        try:
            inputs = taken[0].inputs if len(taken) == 1 else torch.cat([call.inputs for call in taken])
            outputs = self.function(inputs)  # [rows of all taken, ...]
            for call, part in zip(taken, outputs.split([call.rows for call in taken])):
                call.outputs = part
        except Exception as error:  # every caller of the batch sees the failure, none hangs
            for call in taken:
                call.error = error
        finally:
            self.batches, self.calls = self.batches + 1, self.calls + len(taken)
            for call in taken:
                if call.outputs is None and call.error is None:
                    call.error = RuntimeError("the batched call was interrupted")
                call.done = True
