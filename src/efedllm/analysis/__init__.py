"""The paper's analyses, reproduced and measured (eFedLLM §4.1, §4.3, §4.4).

Modules:
- ``memory``: Theorem 4.1, Table 2 and Table 3 (memory reads with and without a memory hierarchy).
- ``bandwidth``: eqs. 15–17 and Figs. 6–7 (BERT's first linear layer under SVD compression),
  plus the dense vs low-rank timing measured on this machine.
- ``io_model``: a two-level memory read counter with a finite block memory of M elements.
- ``softmax_check`` / ``softmax_lookup``: softmax verification by K-digit base-b exponent
  decomposition with lookup tables (§4.4, eqs. 18–22).
- ``report``: the Markdown + PNG report written by ``efedllm analyze``.

Importing this package is cheap on purpose (no torch): verifier worker processes import
``softmax_lookup`` through it.
"""
