"""Reading a catalog's files: regular files only, and none larger than a limit.

A catalog names paths that someone else chose. A manifest row naming ``/dev/zero`` made the indexer
read until the kernel killed it; a FIFO named ``*.jpg`` in a photo folder blocked a build forever. So a
file is judged by ``stat`` (following symlinks: a link is what it points to) before it is opened, then
opened with ``O_NONBLOCK`` (opening a FIFO never waits for a writer) and judged again by ``fstat`` of the
open descriptor, which closes the race of a path swapped between the two calls. Reading stops one byte
past the limit, so a file that grows meanwhile still costs at most the limit.

Everything refused is an :class:`~vitrine.errors.ImageDecodeError` with a short reason, which the indexer
records as a failure of that item before going on.
"""

from __future__ import annotations

import os
import stat

from vitrine.errors import ImageDecodeError

__all__ = ["DEFAULT_MAX_FILE_BYTES", "read_regular_file"]

DEFAULT_MAX_FILE_BYTES: int = 256 * 1024 * 1024
"""Largest file read as an image by default (setting ``--max-file-mb``): far above any photo's size
at the default pixel limit, far below what a worker thread can hold several times at once."""

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_MB = 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def read_regular_file(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at ``path``; ImageDecodeError for anything else or anything larger."""
    name = os.fspath(path)
    try:
        _check(os.stat(name), max_bytes, name)
        fd = os.open(name, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ImageDecodeError("file not found", name) from None
    except PermissionError:
        raise ImageDecodeError("permission denied", name) from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})", name) from None
    try:
        _check(os.fstat(fd), max_bytes, name)
        data = _read_at_most(fd, max_bytes + 1)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})", name) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageDecodeError(_too_large(None, max_bytes), name)
    return data


def _check(st: os.stat_result, max_bytes: int, name: str) -> None:
    kind = next((label for test, label in _KINDS if test(st.st_mode)), None)
    if kind is None and not stat.S_ISREG(st.st_mode):
        kind = "a special file"
    if kind is not None:
        raise ImageDecodeError(f"not a regular file ({kind})", name)
    if st.st_size > max_bytes:
        raise ImageDecodeError(_too_large(st.st_size, max_bytes), name)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _too_large(size: int | None, max_bytes: int) -> str:
    limit = f"the limit of {max_bytes / _MB:.0f} MB (setting max-file-mb)"
    return (
        f"file too large: {size / _MB:.0f} MB exceeds {limit}" if size else f"file too large: exceeds {limit}"
    )
