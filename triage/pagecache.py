"""Worklist pages as the API sends them (JSON), reused until the worklist changes.

Every radiologist's list asks for the same few pages, many times a minute, while the worklist
changes a few times a minute. Each page is therefore built once per worklist version (items
read back and validated, then encoded) and served from memory until any item changes. A
request costs one Redis round trip to read the version (``Worklist.version``), which also
releases expired claims as a fresh query would.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from triage.worklist import Worklist, WorklistQuery, utcnow

DEFAULT_PAGES = 256


@dataclass(frozen=True)
class EncodedPage:
    """A worklist page (``WorklistPage`` as JSON) and how many items it shows."""

    body: bytes
    shown: int


class PageCache:
    """The last ``size`` pages asked for, each valid for the worklist version it was built at.
    Safe to share between the threads of one process."""

    def __init__(self, worklist: Worklist, size: int = DEFAULT_PAGES) -> None:
        self.worklist = worklist
        self.size = size
        self._pages: OrderedDict[tuple[str, int, int], tuple[str, EncodedPage]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, query: WorklistQuery, *, limit: int, offset: int) -> EncodedPage:
        """The page of ``query`` as JSON, built now or at the current worklist version."""
        key = (query.model_dump_json(), limit, offset)
        # Read before the page is built: a change in between leaves the page tagged with the
        # older version, so the next request builds it again rather than keep a stale one.
        version = self.worklist.version(utcnow())
        with self._lock:
            cached = self._pages.get(key)
            if cached is not None and version is not None and cached[0] == version:
                self._pages.move_to_end(key)
                self.hits += 1
                return cached[1]
            self.misses += 1
        page = self.worklist.query(query, limit=limit, offset=offset)
        encoded = EncodedPage(body=page.model_dump_json().encode(), shown=len(page.items))
        if version is not None:
            with self._lock:
                self._pages[key] = (version, encoded)
                self._pages.move_to_end(key)
                while len(self._pages) > self.size:
                    self._pages.popitem(last=False)
        return encoded
