"""Spans of transformer blocks: what a server hosts, a session covers and a chain's hop runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from efedllm.common.records import Count, Positive, WireRecord, require


@dataclass(frozen=True, order=True)
class Span(WireRecord, kind="span"):
    """A half-open range of transformer blocks ``[start, end)``; on the wire ``[start, end]``."""

    start: Count
    end: Positive

    def check(self) -> None:
        require(self.start < self.end, f"span start {self.start} must be below end {self.end}")

    @property
    def length(self) -> int:
        return self.end - self.start

    def contains(self, other: "Span") -> bool:
        return self.start <= other.start and other.end <= self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"

    @classmethod
    def parse(cls, text: str) -> "Span":
        """Parse ``"START:END"`` (the CLI form)."""
        parts = text.split(":")
        require(len(parts) == 2 and all(part.strip().isdigit() for part in parts),
                f"span {text!r} must look like START:END, e.g. 0:10")
        return cls(int(parts[0]), int(parts[1]))

    def to_wire(self) -> list[int]:
        return [self.start, self.end]

    @classmethod
    def from_wire(cls, data: Any) -> "Span":
        require(isinstance(data, (list, tuple)) and len(data) == 2, f"span must be [start, end], got {data!r}")
        return cls(data[0], data[1])


def parse_spans(text: str) -> list[Span]:
    """Parse ``"0:10,10:20,20:30"`` into consecutive spans."""
    spans = [Span.parse(part) for part in text.split(",") if part.strip()]
    require(bool(spans), "no spans given")
    for previous, following in zip(spans, spans[1:]):
        require(previous.end == following.start, f"spans {previous} and {following} are not consecutive")
    return spans
