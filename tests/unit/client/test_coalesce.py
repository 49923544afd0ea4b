"""Concurrent calls merged into one batched call (client/coalesce.py): results, merging, errors, shapes."""

from __future__ import annotations

import threading

import pytest
import torch

from efedllm.client.coalesce import CoalescedCalls


class GatedDouble:
    """Doubles its input; the first call blocks until released, so that the others queue behind it."""

    def __init__(self) -> None:
        self.release, self.entered, self.batches = threading.Event(), threading.Event(), []

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.batches.append(inputs.shape[0])
        if len(self.batches) == 1:
            self.entered.set()
            self.release.wait(10)
        if torch.isnan(inputs).any():
            raise ValueError("NaN in the batch")
        return inputs * 2


def call_in_threads(calls: CoalescedCalls, inputs: list[torch.Tensor], function: GatedDouble) -> list:
    results = [None] * len(inputs)

    def run(index: int) -> None:
        try:
            results[index] = calls(inputs[index])
        except Exception as error:  # noqa: BLE001 - the test reads what each caller saw
            results[index] = error

    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert function.entered.wait(10)
    others = [threading.Thread(target=run, args=(index,)) for index in range(1, len(inputs))]
    for thread in others:
        thread.start()
    while sum(len(call.inputs) for call in calls._waiting) < sum(row.shape[0] for row in inputs[1:]):
        threading.Event().wait(0.001)  # every later call is queued behind the gated one
    function.release.set()
    for thread in [first, *others]:
        thread.join(10)
    return results


def test_waiting_calls_run_as_one_batch_and_each_gets_its_rows():
    function = GatedDouble()
    calls = CoalescedCalls(function)
    inputs = [torch.full((1, 3), float(index)) for index in range(6)]
    results = call_in_threads(calls, inputs, function)
    assert function.batches == [1, 5]  # the lone first call at once, the five that waited together
    for index, result in enumerate(results):
        assert torch.equal(result, inputs[index] * 2)
    assert (calls.batches, calls.calls) == (2, 6)


def test_other_shapes_and_max_rows_run_in_later_batches():
    function = GatedDouble()
    calls = CoalescedCalls(function, max_rows=3)
    inputs = [torch.ones(1, 3), torch.ones(2, 3), torch.ones(1, 4), torch.ones(2, 3), torch.ones(1, 3)]
    results = call_in_threads(calls, inputs, function)
    assert function.batches[0] == 1 and sorted(function.batches[1:]) == [1, 2, 3]  # 2+1 rows of width 3, 2, width 4
    assert all(torch.equal(result, row * 2) for result, row in zip(results, inputs))


def test_a_failing_batch_fails_every_caller_in_it_and_the_next_batch_runs():
    function = GatedDouble()
    calls = CoalescedCalls(function)
    inputs = [torch.ones(1, 2), torch.ones(1, 2), torch.tensor([[float("nan"), 1.0]])]
    results = call_in_threads(calls, inputs, function)
    assert torch.equal(results[0], inputs[0] * 2)
    assert all(isinstance(result, ValueError) for result in results[1:])
    assert torch.equal(calls(torch.ones(1, 2)), torch.full((1, 2), 2.0))  # not stuck after a failure


def test_max_rows_must_be_positive():
    with pytest.raises(ValueError, match="max_rows"):
        CoalescedCalls(lambda inputs: inputs, max_rows=0)
