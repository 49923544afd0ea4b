"""Training requests on a server: the forward or the backward of a span for a client's adapters, holding nothing.

A :class:`~efedllm.protocol.messages.TrainRequest` names the blocks (inside this server's span), what is trained
and the client's tensors; the server's base weights stay frozen and shared with inference. The step runs on the
server's one compute thread, between inference passes. Nothing of a request is kept: a backward recomputes its
forward (the client sends the inputs again), so a client whose server fails replays the step elsewhere.

:class:`TrainingServicer` keeps one :class:`~efedllm.models.adapters.TrainableSpan` per (blocks, what is trained),
at most ``max_trainables`` (least recently used dropped): building one copies the module tree, not the weights.
Call order: ``handle(request)`` from the span servicer's ``rpc_train``.
"""

from __future__ import annotations

import collections
import logging

import torch
from hivemind.proto import runtime_pb2

from efedllm.common.errors import RecordError
from efedllm.models.adapters import AdapterInputError, AdapterSpec, TrainableSpan
from efedllm.models.sessions import SpanSessions
from efedllm.protocol import codec
from efedllm.protocol.messages import TrainRequest

logger = logging.getLogger(__name__)
MAX_TRAIN_TOKENS = 16384  # rows x tokens of one training request: its activations are recomputed and kept for backward


class TrainingServicer:
    def __init__(self, sessions: SpanSessions, compute, max_trainables: int = 8) -> None:
        self.sessions, self.compute, self.max_trainables = sessions, compute, max_trainables
        self._trainables: collections.OrderedDict[tuple, TrainableSpan] = collections.OrderedDict()
        self.requests_served = 0

    async def handle(self, request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        """The answer to a training request: the outputs, or the input gradients then the tensors' gradients."""
        try:
            train = codec.read_message(TrainRequest, request)
            tensors = codec.decode_tensors(request.tensors, train.tensor_count)
            trainable = self._trainable(train)
            hidden, grad_outputs = tensors[0], tensors[1] if train.backward else None
            if hidden.dim() != 3 or hidden.shape[0] * hidden.shape[1] > MAX_TRAIN_TOKENS:
                raise AdapterInputError(f"hidden states must be [batch, tokens, hidden] with at most {MAX_TRAIN_TOKENS} "
                                        f"rows x tokens, got {tuple(hidden.shape)}")
            adapters = dict(zip(train.names, tensors[1 + int(train.backward):]))
            answer = await self.compute(self._run, trainable, hidden, adapters, grad_outputs)
        except (RecordError, AdapterInputError, ValueError) as error:
            return codec.error_reply(f"training request refused: {error}")
        self.requests_served += 1
        return codec.ok_reply(codec.encode_tensors(answer))

    @staticmethod
    def _run(trainable: TrainableSpan, hidden, adapters, grad_outputs) -> list[torch.Tensor]:
        if grad_outputs is None:
            return [trainable.forward(hidden, adapters)]
        grad_hidden, grads = trainable.backward(hidden, adapters, grad_outputs)
        return [grad_hidden, *grads.values()]  # in the request's names order

    def _trainable(self, train: TrainRequest) -> TrainableSpan:
        """The trainable view for the request's blocks and spec (built on first use); ValueError if it does not fit."""
        if not self.sessions.model.span.contains(train.span):
            raise AdapterInputError(f"blocks {train.span} are not inside this server's span {self.sessions.model.span}")
        spec = AdapterSpec(train.method, train.rank, train.alpha, tuple(train.targets), train.prompts) \
            if train.method == "lora" else AdapterSpec(train.method, prompts=train.prompts)
        key = (train.span.start, train.span.end, spec)
        if key not in self._trainables:
            self._trainables[key] = TrainableSpan(self.sessions.model, spec, train.span)
            while len(self._trainables) > self.max_trainables:
                self._trainables.popitem(last=False)
        self._trainables.move_to_end(key)
        return self._trainables[key]
