"""OpenMP wait policy under CPU contention: text-query latency and image throughput, spinning vs passive.

Vitrine sets ``OMP_WAIT_POLICY=PASSIVE`` by default (vitrine/__init__.py). This benchmark shows why: it
starts one busy process per ``--busy`` (simulating a neighbour such as an indexer beside the web app),
then measures a ViT-B/32-sized random CLIP in fresh subprocesses with each policy, in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `python bench/threads.py`
    sys.path.insert(0, str(REPO))

from vitrine.config import arg, parse_args  # noqa: E402

PROBE = """
import json, sys, time, torch
from vitrine.model.encoder import Encoder
from vitrine.config import quiet_libraries
quiet_libraries()
e = Encoder.from_pretrained(sys.argv[1], device="cpu")
e.encode_texts(["warm up"]); px = torch.randn(32, 3, 224, 224); e.encode_pixels(px[:4])
t = time.perf_counter()
for _ in range(10): e.encode_texts(["a dog running on the beach"])
text_ms = (time.perf_counter() - t) / 10 * 1000
t = time.perf_counter(); e.encode_pixels(px); images = 32 / (time.perf_counter() - t)
print(json.dumps({"text_ms": text_ms, "images_per_s": images, "threads": torch.get_num_threads()}))
"""


@dataclasses.dataclass
class Args:
    """Spinning vs passive OpenMP waiting with busy neighbours."""

    busy: int = arg(1, "busy neighbour processes to start (0 = quiet machine)")


def _spin() -> None:
    while True:
        pass


def measure(checkpoint: str, policy: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, checkpoint],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="bench/threads.py")
    from tests.checkpoints import make_clip_checkpoint
    from vitrine.config import quiet_libraries

    quiet_libraries()
    checkpoint = str(make_clip_checkpoint(Path(tempfile.mkdtemp()) / "clip", size="base"))
    neighbours = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in neighbours:
        p.start()
    try:
        rows = [
            (policy, measure(checkpoint, policy)) for policy in ("ACTIVE", "PASSIVE", "ACTIVE", "PASSIVE")
        ]
    finally:
        for p in neighbours:
            p.terminate()
    print(f"busy neighbours: {args.busy}; cores: {os.cpu_count()}; load at end: {os.getloadavg()[0]:.2f}")
    print("| OMP_WAIT_POLICY | torch threads | text query ms | images/s |\n|---|---|---|---|")
    for policy, r in rows:
        print(f"| {policy} | {r['threads']} | {r['text_ms']:.1f} | {r['images_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
