"""The root of efedllm's exceptions: every error the package raises on purpose is an :class:`EfedllmError`.

Subclasses live beside the code that raises them and name what went wrong (``RecordError``: a record
or message from a peer is malformed; ``ChannelError``: a stream broke; ``HopFailure``: a server of a
chain failed; ``SpanInputError``: a step this span cannot serve; ...). Each also derives from the
built-in exception it refines (``ValueError``, ``ConnectionError``, ...), so callers that catch
those keep working. The CLI reports any ``EfedllmError`` in one line.
"""

from __future__ import annotations


class EfedllmError(Exception):
    """Base of every exception efedllm raises on purpose."""


class RecordError(EfedllmError, ValueError):
    """A record or message read from a peer, the DHT or the command line is malformed; the message names the field."""
