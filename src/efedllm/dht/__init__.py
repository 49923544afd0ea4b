"""Everything signed that lives in the DHT: server records, trust verdicts, spot-check evidence, and
the quorum rule that turns verdicts into deactivations.

- ``records``: the record types (strict, versioned).
- ``signed``: storing a record under its signer's key and reading entries back checked.
- ``servers``: announcing and reading server records (discovery).
- ``verdicts``, ``quorum``: verifiers' verdicts, and which of them a client or server obeys.
- ``evidence``: clients' spot-check reports, which verifiers probe first.
"""
