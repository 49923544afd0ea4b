"""Models: resolving a model, loading one span of blocks or the client's parts, running sessions, and
comparing hidden states.

- ``sources``: an alias, a GGUF file or a Hugging Face directory -> where its files are.
- ``weights``: configs, tokenizers and tensors read one at a time.
- ``family``, ``families``, ``llama``: what differs between architectures, and the registry.
- ``span``: a span of blocks loaded alone, and the client's own parts (embeddings, head).
- ``sessions``: per-session KV caches on a span, with validated steps.
- ``comparison``: whether two computations of the same hidden states agree (spot checks, probes).

Import the submodules themselves (``from efedllm.models.span import load_span``): this package
imports nothing, so resolving a model name does not load torch or transformers.
"""
