"""Bounded decoding memory for query uploads: a pixel budget, and freed memory handed back to the OS.

A small file can hold a huge image (a 99-megapixel PNG of one colour is ~300 KB), and decoding it
allocates width x height x channels bytes however small the upload was. :class:`PixelBudget` lets
decodes run side by side only while their pixels together fit in ``total`` (the query pixel limit): many
phone photos at once, but one large image at a time, so the memory held by decodes in flight is bounded
by the budget rather than by the number of requests.

glibc keeps freed heap memory for reuse instead of returning it (its mmap threshold grows after the first
large free, so later large buffers come from the heap), so a burst of large decodes left the process at
its peak size for good. After a large decode :func:`trim` calls ``malloc_trim(0)``, found through ctypes
when the C library has it (glibc); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

#: Decodes at least this large give their memory back to the OS when they finish.
TRIM_PIXELS = 4_000_000


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return freed heap memory to the OS where the C library can (glibc); True if it was asked."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class PixelBudget:
    """At most ``total`` pixels being decoded at once; see the module docstring.

    A decode larger than the whole budget waits until it is alone (it is never refused here: the pixel
    limits refuse images before they get this far).
    """

    def __init__(self, total: int, trim_pixels: int = TRIM_PIXELS) -> None:
        self.total, self.trim_pixels = max(1, int(total)), trim_pixels
        self.in_use = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        cost = min(max(1, int(pixels)), self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.in_use + cost <= self.total)
            self.in_use += cost
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= cost
                self._cond.notify_all()
            if pixels >= self.trim_pixels:
                trim()


class QueryDecodes:
    """How the server decodes query uploads: at most one per core at a time, within a
    :class:`PixelBudget` of ``max_pixels``, and nothing that would decode to more than ``max_pixels``."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.budget = PixelBudget(max_pixels)
        self._slots = threading.BoundedSemaphore(max(1, len(os.sched_getaffinity(0))))

    def load(self, encoder: Any, image: Any) -> Any:
        """``encoder.load_image(image)`` under these limits (ImageDecodeError with the reason)."""
        with self._slots:
            return encoder.load_image(image, max_decoded_pixels=self.max_pixels, admit=self.budget.hold)
