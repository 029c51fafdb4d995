"""Bounded label values: the first ``limit`` distinct values of a label are kept, later ones become ``other``, so
10,000 adapters cannot create 10,000 series per metric."""

from __future__ import annotations

import threading

OTHER = "other"


class LabelBounder:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def admit(self, value: str) -> str:
        """``value`` itself while it is known or there is room for one more; ``other`` beyond the limit."""
        if value in self._known:
            return value
        with self._lock:
            if value in self._known or len(self._known) < self.limit:
                self._known.add(value)
                return value
        return OTHER

    def known(self, value: str) -> str:
        """``value`` when already admitted, else ``other``: failed requests (unknown adapters) take no room."""
        return value if value in self._known else OTHER
