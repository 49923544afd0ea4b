"""SVD compression of a span's projections (eFedLLM §4.2–4.3, eqs. 7–15), measured on a real model.

Modules (importing this package is cheap: nothing is imported here):
- ``rank``: eq. 9 parameter count, eq. 10 ratio, eq. 12 energy rule, eq. 15 ratio rule (pure).
- ``svd``: exact and randomised (Halko–Martinsson–Tropp) truncated SVD.
- ``lowrank``: ``LowRankLinear`` (eq. 9's factors) and ``InterpolativeLinear`` (k rows and their combinations), linear layers as two thin matmuls.
- ``whitening``: activation-whitened truncation (SVD-LLM) from calibration Gram matrices.
- ``allocation``: one global parameter budget split into per-matrix ranks (or dense).
- ``sensitivity``: loss sensitivity of each projection's output, to weigh the allocation.
- ``output_fit``: truncation fitted to the dense model's outputs (reduced-rank regression).
- ``apply``: ``CompressionConfig`` and ``compress_layers`` (in place, with a report).
- ``calibration``: calibration windows from text, layer runners, ``compress_span`` for a server.
- ``transfer``: a span's weights packed as factors or dense, with byte counts (§4.2).
- ``perplexity``: windowed perplexity (``efedllm eval-ppl``, in :mod:`efedllm.cli.eval_ppl`).
"""
