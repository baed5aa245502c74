"""Shared helpers for the benchmarks: machine description, load average, tables, RESULTS.md sections.

Timings on a shared machine are noisy, so every benchmark measures its baseline in the same run,
alternates variants between rounds, and records ``os.getloadavg()`` next to its numbers.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CACHE_DIR = Path(os.environ.get("VITRINE_BENCH_CACHE", Path(tempfile.gettempdir()) / "vitrine-bench"))
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def loadavg() -> str:
    """The 1/5/15-minute load averages, formatted."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine() -> str:
    """CPU model, core count, memory, and library versions: enough to compare runs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        mem = "?"
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f" {f}" in text]
        flags = ", ".join(have)
    except OSError:
        pass
    import numpy
    import torch

    return (
        f"{cpu} ({flags}), {os.cpu_count()} cores, {mem} RAM, Python {platform.python_version()}, "
        f"torch {torch.__version__}, numpy {numpy.__version__}"
    )


def base_checkpoint(size: str = "base") -> Path:
    """A random ViT-B/32-sized CLIP checkpoint, built once and cached (random weights cost the same)."""
    from tests.checkpoints import make_clip_checkpoint

    path = CACHE_DIR / f"clip-{size}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent))
        make_clip_checkpoint(tmp, size=size)
        os.replace(tmp, path)
    return path


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text on a terminal)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section starting with ``heading`` in RESULTS.md, leaving others untouched.

    The file is re-read right before writing, since other benchmarks update their own sections.
    A section runs from its ``## `` heading to the next ``## `` heading.
    """
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    section = f"{heading}\n\n{body.strip()}\n\n"
    new, count = pattern.subn(lambda _m: section, text, count=1)
    if not count:
        new = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new.rstrip("\n") + "\n")
    os.replace(tmp, path)
