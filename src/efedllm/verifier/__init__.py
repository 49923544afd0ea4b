"""The verifier role: probe servers, compare their outputs, score trust, decide activation, credit rewards.

Pure decisions live in :mod:`~efedllm.verifier.comparison` (does a probe pass),
:mod:`~efedllm.verifier.trust` (paper eqs. (3)-(4) and the ``paper`` / ``robust`` policies),
:mod:`~efedllm.verifier.quorum` (which verdicts a client or server obeys). The reward ledger is
:mod:`~efedllm.verifier.ledger` (SQLite, WAL); fault injection for servers is
:mod:`~efedllm.verifier.faults`; the ``efedllm ledger`` command is :mod:`~efedllm.verifier.cli`.
"""
