"""Which client-sent file paths are real uploads this server received (no gradio imports here).

A Gradio ``FileData`` value carries a ``path`` chosen by the client, so a path in an event's input says
nothing by itself: it may name ``/etc/passwd``, a FIFO or ``/dev/zero``. Gradio records every file its
``/upload`` route wrote in ``Blocks.upload_file_set`` (and forgets the ones its cache cleaning deletes);
that set, and nothing on disk, decides. :func:`received_upload` looks the string up *before* touching
the filesystem, then checks that it is still a regular file (not a symlink, FIFO or device) under the
upload folder, so nothing else is ever opened, hashed or read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection

from vitrine.errors import VitrineError


class UploadRefused(VitrineError):
    """A path that is not a file this server received as an upload (``reason`` is the metric label)."""

    reason = "not_an_upload"


def received_upload(path: object, received: Collection[str], folder: str | None = None) -> str:
    """``path`` when it names a regular file this server received as an upload, else UploadRefused.

    ``received`` is the server's record of its uploads (Gradio's ``Blocks.upload_file_set``); ``folder``,
    when given, is the upload cache the file must really lie in (symlinks and ``..`` resolved).
    """
    if not isinstance(path, str | os.PathLike):
        raise UploadRefused(f"expected an uploaded file, got {type(path).__name__}")
    name = os.fspath(path)
    if not isinstance(name, str) or not name or "\x00" in name or name not in received:
        raise UploadRefused("not a file uploaded to this server: upload it first")
    try:
        info = os.lstat(name)
    except OSError:
        raise UploadRefused("the upload is gone (uploads are kept a limited time): send it again") from None
    if not stat.S_ISREG(info.st_mode):
        raise UploadRefused("the upload is not a regular file")
    if folder is not None:
        real, root = os.path.realpath(name), os.path.realpath(folder)
        if not real.startswith(root.rstrip(os.sep) + os.sep):
            raise UploadRefused("not a file uploaded to this server (outside the upload folder)")
    return name


def upload_bytes(paths: list[str]) -> int:
    """Total size of already-checked uploads (``lstat``: nothing is read)."""
    return sum(os.lstat(p).st_size for p in paths)


class Uploads:
    """This server's record of received uploads, attached once the page exists (empty until then)."""

    def __init__(self) -> None:
        self.received: Collection[str] = frozenset()
        self.folder: str | None = None

    def attach(self, received: Collection[str], folder: str) -> None:
        self.received, self.folder = received, folder

    def check(self, path: object) -> str:
        """:func:`received_upload` against this record."""
        return received_upload(path, self.received, self.folder)
