"""The training loop: one code path for a laptop CPU, one GPU, or many processes under ``accelerate``.

Order of work: load the start model, freeze (:mod:`.freezing`), read the pairs, build or load the
frozen-layer cache when it applies (:mod:`.cache`), measure recall before training, then epochs of
symmetric InfoNCE (:mod:`.loss`) with AdamW and warmup + cosine (:mod:`.optim`), an evaluation per
epoch (early stopping, best weights kept), optional WiSE-FT, and the output folder.

Reproducibility and ``--resume``: the whole loop state (epoch, micro-batches done in it, optimizer
step, best recall, the curves) is registered with ``accelerator.save_state`` next to model, optimizer
and RNG states. All data randomness is a function of ``(seed, epoch, item)`` (:mod:`.data`), the
global RNG (dropout) is reseeded from ``(seed, epoch, batch, process)`` before every micro-batch, so
nothing that draws random numbers elsewhere (a DataLoader creating its iterator, an evaluation) can
shift it, and the learning rate is a function of the step. Resuming therefore skips the batches
already seen and reproduces the uninterrupted run's loss curve step for step.

Gradient accumulation goes through ``accelerator.accumulate`` (no DDP sync on inner micro-batches);
each micro-batch is its own contrastive problem, so accumulation adds steps, not negatives.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from train_contrastive.args import LOGIT_SCALE_MAX, TrainArgs
from train_contrastive.cache import CachedCollator, CachedPairs, build_cache, cache_key, load_or_build
from train_contrastive.card import write_card
from train_contrastive.curves import plot, write_csv
from train_contrastive.data import (
    EpochSampler,
    ImageCaptionDataset,
    PairCollator,
    load_pairs,
)
from train_contrastive.features import FeatureCache, replayable
from train_contrastive.freezing import apply_freezing, count_parameters
from train_contrastive.loss import contrastive_loss
from train_contrastive.model import ContrastiveModule, load_start, save_output
from train_contrastive.optim import lr_factor, param_groups, set_lr
from train_contrastive.recall import cached_recall, served_recall
from train_contrastive.wise import interpolate, restore, snapshot
from vitrine import towers
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
        """Add the wall-clock and CPU time since ``began`` (from :func:`_now`) to the training time.

        CPU time is kept next to wall-clock time because on a shared machine the wall clock measures
        the neighbours as much as the recipe."""
        wall, cpu = _now()
        self.train_seconds += wall - began[0]
        self.train_cpu_seconds += cpu - began[1]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _now() -> tuple[float, float]:
    """``(wall-clock, CPU time of this process)`` in seconds."""
    return time.perf_counter(), time.process_time()


def resolve_precision(choice: str) -> str:
    """``auto``: bf16 on GPUs that support it, else fp16 on GPUs; on a CPU, bf16 where it has native bf16
    dot products (AVX512-BF16/AMX), else full precision.

    On a CPU with native bf16, autocast makes a training step about a fifth cheaper (DeiT-tiny +
    MiniLM top blocks, measured) -- more epochs in the same half hour -- while weights, optimizer
    state, the loss and the embeddings' normalisation stay in float32. Without native bf16 the format
    is emulated and slower than float32.
    """
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    from vitrine.encoder import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "no"


def _checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return sorted(folder.glob("step-*")) if folder.is_dir() else []


def _resume_path(args: TrainArgs) -> Path:
    if args.resume == "latest":
        found = _checkpoints(Path(args.output))
        if not found:
            raise TrainingError(f"--resume latest: no checkpoint under {args.output}/checkpoints")
        return found[-1]
    path = Path(str(args.resume))
    if not path.is_dir():
        raise TrainingError(f"--resume {path}: no such checkpoint folder")
    return path


def train(args: TrainArgs, log: Any = None) -> dict[str, Any]:
    """Run a fine-tune described by ``args``; returns the training report (also saved as JSON).

    ``log(message)`` receives one-line progress notes (the CLI prints them on the main process).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    try:
        args.validate()
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    out = Path(args.output)
    # Data problems surface before any model is loaded.
    train_pairs = load_pairs(args.train_data, args.image_column, args.caption_column)
    eval_pairs = (
        load_pairs(args.eval_data, args.image_column, args.caption_column) if args.eval_data else None
    )
    tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = Accelerator(
        mixed_precision=resolve_precision(args.mixed_precision),
        gradient_accumulation_steps=args.grad_accum,
        log_with=tracker,
        project_dir=str(out / "runs"),
    )
    note = (log or (lambda _m: None)) if accelerator.is_main_process else (lambda _m: None)
    set_seed(args.seed)
    device, world = accelerator.device, accelerator.num_processes

    model, image_processor, tokenizer, new_heads = load_start(
        args.model, args.vision_model, args.text_model, args.projection_dim, args.temperature
    )
    starts = apply_freezing(
        model, lock_vision=args.lock_vision, lock_text=args.lock_text, unfreeze_last_n=args.unfreeze_last_n
    )
    start_weights = snapshot(model) if args.wise_alpha is not None else {}
    kind = towers.model_kind(model)
    cached = (
        args.cache and not args.augment and replayable(model) and (starts["vision"] > 0 or starts["text"] > 0)
    )
    model.to(device)
    note(
        f"model: {kind}, first trainable block {starts}, cache: {cached}, "
        f"processes: {world}, device: {device}"
    )

    identity = {
        "start": args.model
        or [str(Path(args.vision_model or "").resolve()), str(Path(args.text_model or "").resolve())],
        "starts": starts,
        "dtype": args.cache_dtype,
        "max_length": args.max_length,
    }
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    caches: dict[str, FeatureCache] = {}
    cache_seconds = 0.0
    if cached:
        began = time.perf_counter()
        with accelerator.main_process_first():
            for name, pairs in (("train", train_pairs), ("eval", eval_pairs)):
                if pairs is None:
                    continue
                key = cache_key(identity, pairs, image_processor)
                bar = tqdm(
                    total=len(pairs) + pairs.n_captions,
                    desc=f"caching frozen layers ({name})",
                    disable=not (args.progress and accelerator.is_main_process),
                    file=sys.stderr,
                )
                caches[name] = load_or_build(
                    cache_dir / f"{name}-{key}.pt",
                    lambda pairs=pairs: build_cache(
                        model, pairs, image_processor, tokenizer, starts,
                        batch_size=args.eval_batch_size, num_workers=args.num_workers,
                        limit=towers.text_limit(model, tokenizer, args.max_length),
                        dtype=getattr(torch, args.cache_dtype),
                        device=device, progress=bar.update,  # noqa: B023 - called at once
                    ),
                )  # fmt: skip
                bar.close()
        cache_seconds = time.perf_counter() - began
        note(f"frozen-layer cache ready in {cache_seconds:.0f} s")

    if cached:
        usable = caches["train"].usable()
        collator: Any = CachedCollator(caches["train"], train_pairs, args.seed)
        dataset: Any = CachedPairs()
        workers = 0
    else:
        usable = list(range(len(train_pairs)))
        dataset = ImageCaptionDataset(train_pairs, image_processor, seed=args.seed, augment=args.augment)
        collator = PairCollator(tokenizer, kind, towers.text_limit(model, tokenizer, args.max_length))
        workers = args.num_workers
    batch_size = min(args.batch_size, len(usable) // world)
    if batch_size < 2:
        raise TrainingError(f"{len(usable)} usable training pairs: too few for {world} process(es)")
    sampler = EpochSampler(usable, args.seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, num_workers=workers,
        drop_last=True, generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    module = ContrastiveModule(model, starts, cached, args.patch_dropout if cached else 0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(
            model, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay, new_heads=new_heads
        )
    )
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / args.grad_accum)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup = round(args.warmup_ratio * total_steps)

    state = LoopState()
    accelerator.register_for_checkpointing(state)
    if cached:
        state.bad.update(caches["train"].failures)  # undecodable files never entered the cache
    if args.resume:
        path = _resume_path(args)
        accelerator.load_state(str(path))
        note(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batches_done})")
    if tracker:
        accelerator.init_trackers(
            "train_contrastive", config={k: str(v) for k, v in dataclasses.asdict(args).items()}
        )

    def measure() -> dict[str, Any] | None:
        if eval_pairs is None:
            return None
        inner = accelerator.unwrap_model(module).model
        if cached:
            report = cached_recall(inner, caches["eval"], starts, device, args.eval_batch_size)
        else:
            report = served_recall(
                inner, image_processor, tokenizer, eval_pairs, device, args.eval_batch_size
            )
        module.train()
        return report

    def record_eval(report: dict[str, Any]) -> None:
        row = {"step": state.step, "epoch": state.epoch}
        row.update({f"{d}_{k}": v for d in ("t2i", "i2t") for k, v in report[d].items()})
        state.evals.append(row)
        note("recall " + " ".join(f"{k}={v}" for k, v in row.items()))
        if tracker:
            accelerator.log({k: v for k, v in row.items() if "@" in k}, step=state.step)

    def save_checkpoint() -> None:
        target = out / "checkpoints" / f"step-{state.step:07d}"
        accelerator.save_state(str(target))
        if accelerator.is_main_process:
            for old in _checkpoints(out)[: -max(1, args.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    if state.before is None and eval_pairs is not None:
        state.before = measure()
        record_eval(state.before)

    module.train()
    bar = tqdm(
        total=total_steps, initial=state.step, desc="training", unit="step",
        disable=not (args.progress and accelerator.is_main_process), file=sys.stderr,
    )  # fmt: skip
    stop_reason = "all epochs done"
    last_saved = -1
    began = _now()
    while state.epoch < args.epochs and stop_reason == "all epochs done":
        sampler.set_epoch(state.epoch)
        (collator if cached else dataset).set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batches_done) if state.batches_done else loader
        # accelerate's loaders re-set the sampler's epoch from their own iteration counter on __iter__,
        # which restarts at 0 in a resumed run: tell them the real epoch.
        batches.set_epoch(state.epoch)
        losses: list[float] = []
        for batch in batches:
            state.batches_done += 1
            for index, reason in batch.get("bad", {}).items():
                state.bad[train_pairs.paths[int(index)]] = reason
            # Dropout noise as a function of (seed, epoch, batch, process), never of what ran before.
            torch.manual_seed(
                ((args.seed * 1_000_003 + state.epoch) * 1_000_003 + state.batches_done) * 1024
                + accelerator.process_index
            )
            with accelerator.accumulate(module):
                images, texts, logit_scale = module(batch)
                result = contrastive_loss(images, texts, logit_scale)
                accelerator.backward(result.backward_loss)
                if accelerator.sync_gradients:
                    if args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    set_lr(optimizer.param_groups, lr_factor(state.step, total_steps, warmup))
                optimizer.step()
                optimizer.zero_grad()
            losses.append(float(result.loss.detach()))
            state.samples += result.negatives + 1  # the global batch
            if not accelerator.sync_gradients:
                continue
            with torch.no_grad():
                accelerator.unwrap_model(module).model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
            state.step += 1
            row = {
                "step": state.step,
                "epoch": state.epoch + state.batches_done / len(loader),
                "loss": sum(losses) / len(losses),
                "lr": optimizer.param_groups[0]["lr"],
                "logit_scale": float(logit_scale.detach()),
                "negatives": result.negatives,
                "accuracy": result.accuracy,
            }
            losses = []
            state.history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if tracker:
                accelerator.log({"loss": row["loss"], "lr": row["lr"]}, step=state.step)
            if args.checkpoint_every and state.step % args.checkpoint_every == 0:
                state.add_time(began)
                began = _now()
                save_checkpoint()
                last_saved = state.step
            if args.max_steps and state.step >= args.max_steps:
                stop_reason = f"reached --max-steps {args.max_steps}"
                break
        else:
            state.epoch += 1
            state.batches_done = 0
            state.add_time(began)
            report = measure()
            began = _now()
            if report is not None:
                record_eval(report)
                score = sum(report["t2i"].values()) / len(report["t2i"])
                if score > state.best:
                    state.best, state.stale = score, 0
                    if args.keep_best:
                        state.best_weights = snapshot(accelerator.unwrap_model(module).model)
                else:
                    state.stale += 1
                    if args.patience and state.stale >= args.patience:
                        stop_reason = f"no better recall for {args.patience} evaluation(s)"
    bar.close()
    if stop_reason != "all epochs done" and state.batches_done:
        state.add_time(began)
    if last_saved != state.step:
        save_checkpoint()
    return _finish(
        accelerator, module, state, args, out, image_processor, tokenizer, start_weights, measure,
        extra={"stop_reason": stop_reason, "cached": cached, "cache_seconds": cache_seconds,
               "starts": starts, "train_pairs": len(usable), "processes": world, "device": str(device),
               "model_kind": kind, "steps_per_epoch": steps_per_epoch},
    )  # fmt: skip


def _finish(
    accelerator: Any,
    module: Any,
    state: LoopState,
    args: TrainArgs,
    out: Path,
    image_processor: Any,
    tokenizer: Any,
    start_weights: dict[str, torch.Tensor],
    measure: Any,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Best weights, WiSE-FT, final recall, then the output folder (main process only)."""
    model = accelerator.unwrap_model(module).model
    if args.keep_best and state.best_weights:
        restore(model, state.best_weights)
    if args.wise_alpha is not None:
        interpolate(model, start_weights, args.wise_alpha)
    after = measure()
    trainable, total = count_parameters(model)
    report = {
        **extra,
        "args": dataclasses.asdict(args),
        "steps": state.step,
        "epochs_run": round(state.history[-1]["epoch"], 3) if state.history else 0,
        "train_seconds": state.train_seconds,
        "train_cpu_seconds": state.train_cpu_seconds,
        "precision": accelerator.mixed_precision,
        "samples_per_second": state.samples / state.train_seconds if state.train_seconds else 0.0,
        "train_skipped": len(state.bad),
        "skipped_files": state.bad,
        "recall_before": state.before,
        "recall_after": after,
        "temperature": float(torch.exp(-model.logit_scale.detach().float())),
        "pooling": towers.pooling_of(model),
        "trainable": trainable,
        "total": total,
    }
    if accelerator.is_main_process:
        save_output(model, image_processor, tokenizer, out)
        write_csv(out / "metrics.csv", state.history)
        write_csv(out / "eval.csv", state.evals)
        plot(out / "curves.png", state.history, state.evals)
        write_card(out / "README.md", report)
        (out / "train_report.json").write_text(json.dumps(report, indent=2, default=str))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


__all__ = ["LoopState", "TrainingError", "train"]
