"""An unlucky machine: native code crashing inside a live server.

A segfault in torch, FAISS, PIL or the interpreter ends the process without a Python traceback. The
server enables ``faulthandler`` for every thread, so the log keeps the stacks an operator needs.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tests.app.live import start_server, stop


def test_a_native_crash_leaves_every_threads_python_stack_in_the_log(tmp_path: Path, clip_path: Path) -> None:
    log = tmp_path / "server.log"
    _, proc = start_server(tmp_path / "index", log, "--model", str(clip_path))
    try:
        proc.send_signal(signal.SIGSEGV)  # what a crash in native code raises
        assert proc.wait(timeout=30) == -signal.SIGSEGV
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    text = log.read_text(errors="replace")
    assert "Fatal Python error: Segmentation fault" in text
    assert "Current thread" in text or "Thread 0x" in text
    assert text.count("File ") >= 2  # Python frames, not just the headline
