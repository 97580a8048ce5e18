"""A pickle payload that proves whether a loader runs code from a file."""

from __future__ import annotations

from pathlib import Path


class TouchOnLoad:
    """Unpickling this creates ``marker``: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
