"""Progress bars for model loading, shown only on a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from rich.progress import Progress

Item = TypeVar("Item")


def loading_progress(items: Iterable[Item], description: str) -> Iterator[Item]:
    """Yield ``items``, drawing a transient rich progress bar on stderr when it is a terminal."""
    items = list(items)
    if not sys.stderr.isatty():
        yield from items
        return
    with Progress(transient=True) as progress:
        task = progress.add_task(f"loading {description}", total=len(items))
        for item in items:
            yield item
            progress.advance(task)
