"""Models: resolving a model, loading one span of blocks or the client's parts, running sessions, and
comparing hidden states.

- ``sources``: an alias, a GGUF file or a Hugging Face directory -> where its files are.
- ``weights``: configs, tokenizers and tensors read one at a time.
- ``family``, ``families``, ``llama``: what differs between architectures, and the registry.
- ``span``: a span of blocks loaded alone, and the client's own parts (embeddings, head).
- ``sessions``: per-session KV caches on a span, with validated steps.
- ``comparison``: whether two computations of the same hidden states agree (spot checks, probes).
"""

from __future__ import annotations

from efedllm.models.sessions import SpanInputError, SpanSessions, UnknownSessionError
from efedllm.models.sources import ModelNotFoundError, ModelSource, resolve_model
from efedllm.models.span import ClientParts, SpanModel, load_client_parts, load_span

__all__ = ["load_span", "load_client_parts", "resolve_model", "ModelSource", "ModelNotFoundError", "SpanModel",
           "ClientParts", "SpanSessions", "SpanInputError", "UnknownSessionError"]
