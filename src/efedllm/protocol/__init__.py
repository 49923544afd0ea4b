"""What two peers must agree on: messages, tensor encodings, open streams, the last hop's delivery and
the span service's interface.

- ``messages``: typed, versioned requests, replies and deliveries.
- ``codec``: hidden states and metadata as protobufs (wire formats float32/bfloat16/float16/int8).
- ``channel``: open request/response and one-way streams between two peers.
- ``delivery``: the requester's end of a chained step (the last hop delivers straight to it).
- ``service``: the span service's handler names, its interface (which servers register with their
  implementation) and ``RemoteSpanStub``, how a client or verifier calls a server.

A step travels: client -> ``service.RemoteSpanStub.push_step`` -> ``channel`` -> server handler
(``efedllm.server.handler``) -> ``channel`` -> next hop's handler -> ... -> last hop ->
``delivery`` -> client.
"""
