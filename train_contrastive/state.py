"""What ``--resume`` restores besides weights, optimizer and RNG, and where training states are saved.

The whole loop state (epoch, micro-batches done in it, optimizer step, best recall, the curves) is a
:class:`LoopState` registered with ``accelerator.save_state``, so a checkpoint folder under
``OUTPUT/checkpoints/step-NNNNNNN`` holds everything a resumed run needs to continue step for step.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from train_contrastive.args import TrainArgs
from vitrine.errors import VitrineError


class TrainingError(VitrineError):
    """Training cannot start or continue (nothing to train on, no checkpoint to resume from)."""


@dataclass
class LoopState:
    """Everything besides weights, optimizer and RNG that ``--resume`` needs; saved with each checkpoint."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    best: float = -1.0
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)
    before: dict[str, Any] | None = None
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    samples: int = 0
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def add_time(self, began: tuple[float, float]) -> None:
        """Add the wall-clock and CPU time since ``began`` (from :func:`now`) to the training time.

        CPU time is kept next to wall-clock time because on a shared machine the wall clock measures
        the neighbours as much as the recipe."""
        wall, cpu = now()
        self.train_seconds += wall - began[0]
        self.train_cpu_seconds += cpu - began[1]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def now() -> tuple[float, float]:
    """``(wall-clock, CPU time of this process)`` in seconds."""
    return time.perf_counter(), time.process_time()


def checkpoints(out: Path) -> list[Path]:
    """The saved training states under ``out``, oldest first."""
    folder = out / "checkpoints"
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


def resume_path(args: TrainArgs) -> Path:
    """The folder ``--resume`` names (``latest``: the newest under ``--output``)."""
    if args.resume == "latest":
        found = checkpoints(Path(args.output))
        if not found:
            raise TrainingError(f"--resume latest: no checkpoint under {args.output}/checkpoints")
        return found[-1]
    path = Path(str(args.resume))
    if not path.is_dir():
        raise TrainingError(f"--resume {path}: no such checkpoint folder")
    return path


def save_checkpoint(accelerator: Any, state: LoopState, out: Path, keep: int) -> None:
    """Save the training state at this step, keeping the newest ``keep`` (at least one)."""
    target = out / "checkpoints" / f"step-{state.step:07d}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        for old in checkpoints(out)[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
