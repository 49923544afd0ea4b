"""Models: resolving a model, loading one span of blocks or the client's parts, running sessions, and
comparing hidden states.

- ``sources``: an alias, a GGUF file or a Hugging Face directory -> where its files are.
- ``weights``: configs, tokenizers and tensors read one at a time.
- ``family``, ``families``: what differs between architectures, and the registry; one module per family
  (``llama``, ``qwen``, ``mistral``, ``gemma3``, ``mixtral``).
- ``synthetic``: random-weight models built from a config offline, and GGUF files written as llama.cpp does.
- ``span``: a span of blocks loaded alone, and the client's own parts (embeddings, head).
- ``sessions``: per-session KV caches on a span, with validated steps.
- ``comparison``: whether two computations of the same hidden states agree (spot checks, probes).

Import the submodules themselves (``from efedllm.models.span import load_span``): this package
imports nothing, so resolving a model name does not load torch or transformers.
"""
