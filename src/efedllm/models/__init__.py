"""Models: resolving a model, loading one span of blocks or the client's parts, and running sessions.

Heavy imports (torch, transformers) happen when these names are first used, not at import.
"""

from __future__ import annotations

__all__ = ["load_span", "load_client_parts", "resolve_model", "SpanModel", "ClientParts", "SpanSessions", "SpanInputError"]


def __getattr__(name: str):
    if name in ("load_span", "load_client_parts", "SpanModel", "ClientParts", "parse_dtype"):
        from efedllm.models import span

        return getattr(span, name)
    if name in ("SpanSessions", "SpanInputError", "UnknownSessionError"):
        from efedllm.models import sessions

        return getattr(sessions, name)
    if name in ("resolve_model", "ModelSource", "ModelNotFoundError"):
        from efedllm.models import sources

        return getattr(sources, name)
    raise AttributeError(name)
