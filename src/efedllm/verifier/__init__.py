"""The verifier role: probe servers, compare their outputs, score trust, decide activation, credit rewards.

The node (:mod:`~efedllm.verifier.node`, run by ``efedllm verify``) probes servers through the span
service (:mod:`efedllm.protocol.service`) and publishes verdicts in the DHT
(:mod:`efedllm.dht.verdicts`). Pure decisions live in :mod:`~efedllm.models.comparison` (does a
probe pass) and :mod:`~efedllm.verifier.trust` (paper eqs. (3)-(4) and the ``paper`` / ``robust``
policies); which verdicts a client or server obeys is :mod:`efedllm.dht.quorum`. The reward
ledger is :mod:`~efedllm.verifier.ledger` (SQLite, WAL), shown by ``efedllm ledger``.
"""
