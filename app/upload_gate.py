"""The gate in front of every event: only files this server received as uploads may be named.

A Gradio client names a file by sending a ``FileData``-shaped object (``{"path": ..., "meta": {"_type":
"gradio.FileData"}}``) as an event input. Gradio then copies (and hashes) that file into its cache before
any of our code runs, and its own check that the path is an upload (``processing_utils._check_allowed``)
returns early unless ``Blocks.has_launched`` is set, which ``gr.mount_gradio_app`` never does. Even with
it set, that check covers neither a payload without ``meta`` (``gr.Image``'s data model accepts it and
hands the raw path to ``preprocess``) nor http(s) URLs (downloaded by the server).

So :func:`only_uploads` puts one check in front of every event's preprocessing, for every component:
every file reference in the inputs must be a file this server's upload route wrote (``Blocks.
upload_file_set``, checked by :func:`app.uploads.received_upload`: a lookup of the string first, so any
other path is refused without touching the filesystem), otherwise the event is refused with
:data:`REFUSED`, one message whatever the path names (no "not found" vs "not an image" oracle). Nothing is
opened, hashed or copied, so ``/dev/zero`` or a FIFO cannot block the event loop.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder
from pydantic import ValidationError

from app.uploads import UploadRefused, received_upload

REFUSED = (
    "only files uploaded to this server can be used: upload the photo first (POST /gradio_api/upload, "
    "or gradio_client's handle_file); server paths and URLs are refused"
)

#: Components whose whole value is file data: any object with a ``path`` in it names a file.
_FILE_TYPES = ("image", "file", "gallery", "video", "audio", "model3d", "uploadbutton", "imageeditor")


def is_upload(blocks: gr.Blocks, path: Any) -> bool:
    """True when ``path`` names a regular file ``blocks``' upload route wrote into the upload folder."""
    try:
        received_upload(path, blocks.upload_file_set, get_upload_folder())
    except UploadRefused:
        return False
    return True


def file_references(value: Any, whole_value_is_file: bool) -> list[Any]:
    """``path`` values a Gradio preprocessing step would treat as files, found without recursion (a
    deeply nested input costs a loop, not the stack). For a file component every object with a
    ``path`` counts; elsewhere only objects marked as ``gradio.FileData``, as Gradio itself decides."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            meta = item.get("meta")
            marked = isinstance(meta, dict) and meta.get("_type") == "gradio.FileData"
            if "path" in item and (whole_value_is_file or marked):
                found.append(item["path"])
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return found


def check_inputs(blocks: gr.Blocks, input_ids: list[int], inputs: list[Any]) -> None:
    """gr.Error(REFUSED) when any input names a file that is not an upload (``None`` paths are absent)."""
    for block_id, value in zip(input_ids, inputs, strict=False):
        block = blocks.blocks.get(block_id)
        is_file = getattr(block, "get_block_name", lambda: "")() in _FILE_TYPES
        for path in file_references(value, is_file):
            if path is not None and not is_upload(blocks, path):
                raise gr.Error(REFUSED, title="Refused", print_exception=False)


def only_uploads(blocks: gr.Blocks) -> None:
    """Refuse every event whose inputs name a file that was not uploaded here (module docstring).

    A per-instance wrapper of ``Blocks.preprocess_data``: the one step every event's inputs pass through
    before Gradio touches a file. ``has_launched`` is set too, as ``launch()`` would, so Gradio's own
    check also applies to anything our wrapper would let through. Values of the wrong shape for their
    component (a list of numbers for a file list) or too few values get one short message instead of
    pydantic's report or Gradio's listing of component objects.
    """
    original = blocks.preprocess_data

    async def preprocess_data(block_fn: Any, inputs: list[Any], *args: Any, **kwargs: Any) -> Any:
        if len(inputs) < len(block_fn.inputs):  # Gradio's own message lists its objects' reprs
            message = f"this event takes {len(block_fn.inputs)} input values, got {len(inputs)}"
            raise gr.Error(message, title="Refused", print_exception=False)
        check_inputs(blocks, [b._id for b in block_fn.inputs], inputs)
        try:
            return await original(block_fn, inputs, *args, **kwargs)
        except gr.Error as exc:  # a component refused a value (a dropdown choice): the client's error,
            exc.print_exception = False  # not the server's, so no traceback in the log per request
            raise
        except ValidationError as exc:  # a value of the wrong shape for its component: say so briefly
            first = exc.errors()[0].get("msg", "") if exc.error_count() else ""
            raise gr.Error(
                f"malformed input: {first[:200]}", title="Refused", print_exception=False
            ) from None

    blocks.preprocess_data = preprocess_data  # type: ignore[method-assign]
    blocks.has_launched = True
