"""The training loop: one code path for a laptop CPU, one GPU, or many processes under ``accelerate``.

Order of work: read the pairs, load the start model and freeze it, build or load the frozen-layer
cache when it applies, the batches and the optimizer (all in :mod:`.prepare`), measure recall before
training, then epochs of the chosen loss (:mod:`.loss`; symmetric InfoNCE by default) with AdamW and
warmup + cosine (:mod:`.optim`), an evaluation per epoch (early stopping, best weights kept), optional
WiSE-FT, and the output folder.

Reproducibility and ``--resume``: the whole loop state (:class:`.state.LoopState`: epoch, micro-batches
done in it, optimizer step, best recall, the curves) is registered with ``accelerator.save_state``
next to model, optimizer and RNG states. All data randomness is a function of ``(seed, epoch, item)``
(:mod:`.data`), the global RNG (dropout) is reseeded from ``(seed, epoch, batch, process)`` before every
micro-batch, so nothing that draws random numbers elsewhere (a DataLoader creating its iterator, an
evaluation) can shift it, and the learning rate is a function of the step. Resuming therefore skips the
batches already seen and reproduces the uninterrupted run's loss curve step for step.

Gradient accumulation goes through ``accelerator.accumulate`` (no DDP sync on inner micro-batches);
each micro-batch is its own contrastive problem, so accumulation adds steps, not negatives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train_contrastive.args import LOGIT_SCALE_MAX, TrainArgs
from train_contrastive.averaging import WeightAverage
from train_contrastive.card import write_card
from train_contrastive.curves import plot, write_csv
from train_contrastive.data import Pairs, load_pairs
from train_contrastive.features import FeatureCache
from train_contrastive.freezing import count_parameters
from train_contrastive.loss import LOSSES, LossOutput
from train_contrastive.model import save_output
from train_contrastive.optim import lr_factor, set_lr
from train_contrastive.prepare import (
    Batches,
    StartModel,
    build_caches,
    load_model,
    make_accelerator,
    make_batches,
    make_module,
    make_optimizer,
)
from train_contrastive.queue import NegativeQueue
from train_contrastive.recall import cached_recall, served_recall
from train_contrastive.state import LoopState, TrainingError, now, resume_path, save_checkpoint
from train_contrastive.wise import interpolate, restore, snapshot
from vitrine.model import embedding

ALL_EPOCHS = "all epochs done"


@dataclass
class Run:
    """One training run's collaborators, built before the first step and shared by the loop's steps."""

    args: TrainArgs
    accelerator: Any
    start: StartModel
    batches: Batches
    module: Any  # the prepared ContrastiveModule
    optimizer: Any
    trainable: list[torch.nn.Parameter]
    loader: Any  # the prepared DataLoader
    train_pairs: Pairs
    eval_pairs: Pairs | None
    caches: dict[str, FeatureCache]
    state: LoopState
    queue: NegativeQueue
    average: WeightAverage
    total_steps: int
    warmup: int
    tracker: str | None
    note: Callable[[str], None]
    bar: Any = None
    began: tuple[float, float] = (0.0, 0.0)  # when the training time not yet added to the state began
    last_saved: int = -1

    @property
    def out(self) -> Path:
        return Path(self.args.output)

    @property
    def model(self) -> Any:
        return self.accelerator.unwrap_model(self.module).model


def train(args: TrainArgs, log: Any = None) -> dict[str, Any]:
    """Run a fine-tune described by ``args``; returns the training report (also saved as JSON).

    ``log(message)`` receives one-line progress notes (the CLI prints them on the main process).
    """
    from accelerate.utils import set_seed

    try:
        args.validate()
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    # Data problems surface before any model is loaded.
    train_pairs = load_pairs(args.train_data, args.image_column, args.caption_column)
    eval_pairs = (
        load_pairs(args.eval_data, args.image_column, args.caption_column) if args.eval_data else None
    )
    accelerator, tracker = make_accelerator(args, Path(args.output))
    note = (log or (lambda _m: None)) if accelerator.is_main_process else (lambda _m: None)
    set_seed(args.seed)
    start = load_model(args, accelerator.device)
    note(
        f"model: {start.kind}, first trainable block {start.starts}, cache: {start.cached}, "
        f"processes: {accelerator.num_processes}, device: {accelerator.device}"
    )
    pairs = {"train": train_pairs, "eval": eval_pairs}
    caches, cache_seconds = _caches(args, start, accelerator, pairs, note)
    run = _prepare_run(args, accelerator, start, caches, train_pairs, eval_pairs, tracker, note)
    stop_reason = _train_until_done(run)
    extra = {
        "stop_reason": stop_reason,
        "cached": start.cached,
        "cache_seconds": cache_seconds,
        "starts": start.starts,
        "train_pairs": len(run.batches.usable),
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "model_kind": start.kind,
        "steps_per_epoch": math.ceil(len(run.loader) / args.grad_accum),
    }
    return _finish(run, extra)


def _caches(
    args: TrainArgs,
    start: StartModel,
    accelerator: Any,
    named_pairs: dict[str, Pairs | None],
    note: Callable[[str], None],
) -> tuple[dict[str, FeatureCache], float]:
    """The frozen-layer caches when they apply, and the seconds they took to build or load."""
    if not start.cached:
        return {}, 0.0
    began = time.perf_counter()
    caches = build_caches(args, start, accelerator, named_pairs)
    seconds = time.perf_counter() - began
    note(f"frozen-layer cache ready in {seconds:.0f} s")
    return caches, seconds


def _prepare_run(
    args: TrainArgs,
    accelerator: Any,
    start: StartModel,
    caches: dict[str, FeatureCache],
    train_pairs: Pairs,
    eval_pairs: Pairs | None,
    tracker: str | None,
    note: Callable[[str], None],
) -> Run:
    """Batches, optimizer and schedule, then the loop state (restored with ``--resume``)."""
    batches = make_batches(args, start, caches, train_pairs, accelerator.num_processes)
    module = make_module(args, start)
    trainable = [p for p in module.parameters() if p.requires_grad]  # the model, and a loss bias
    optimizer = make_optimizer(args, start, module)
    module, optimizer, loader = accelerator.prepare(module, optimizer, batches.loader)
    total_steps = args.epochs * math.ceil(len(loader) / args.grad_accum)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    state, queue = LoopState(), NegativeQueue(args.queue_size)
    average = WeightAverage(accelerator.unwrap_model(module).model, args.ema)
    accelerator.register_for_checkpointing(state)
    accelerator.register_for_checkpointing(queue)
    if average.active:
        accelerator.register_for_checkpointing(average)
    if start.cached:
        state.bad.update(caches["train"].failures)  # undecodable files never entered the cache
    if args.resume:
        path = resume_path(args)
        accelerator.load_state(str(path))
        note(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batches_done})")
    if tracker:
        accelerator.init_trackers(
            "train_contrastive", config={k: str(v) for k, v in dataclasses.asdict(args).items()}
        )
    warmup = round(args.warmup_ratio * total_steps)
    return Run(
        args=args,
        accelerator=accelerator,
        start=start,
        batches=batches,
        module=module,
        optimizer=optimizer,
        trainable=trainable,
        loader=loader,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        caches=caches,
        state=state,
        queue=queue,
        average=average,
        total_steps=total_steps,
        warmup=warmup,
        tracker=tracker,
        note=note,
    )


def _train_until_done(run: Run) -> str:
    """Recall before training, then epochs until the last, ``--max-steps`` or ``--patience``; returns why
    training stopped. A final checkpoint is saved unless the last step already was."""
    from tqdm import tqdm

    state, args = run.state, run.args
    if state.before is None and run.eval_pairs is not None:
        state.before = _measure(run)
        _record_eval(run, state.before)
    run.module.train()
    run.bar = tqdm(
        total=run.total_steps,
        initial=state.step,
        desc="training",
        unit="step",
        disable=not (args.progress and run.accelerator.is_main_process),
        file=sys.stderr,
    )
    stop_reason: str | None = None
    run.began = now()
    while state.epoch < args.epochs and stop_reason is None:
        stop_reason = _train_epoch(run) or _end_epoch(run)
    run.bar.close()
    if stop_reason is not None and state.batches_done:
        state.add_time(run.began)
    if run.last_saved != state.step:
        _save(run)
    return stop_reason or ALL_EPOCHS


def _train_epoch(run: Run) -> str | None:
    """The rest of the current epoch (all of it unless resumed mid-epoch); why to stop early, if so."""
    state, accelerator = run.state, run.accelerator
    run.batches.sampler.set_epoch(state.epoch)
    run.batches.augmenter.set_epoch(state.epoch)
    batches = (
        accelerator.skip_first_batches(run.loader, state.batches_done) if state.batches_done else run.loader
    )
    # accelerate's loaders re-set the sampler's epoch from their own iteration counter on __iter__,
    # which restarts at 0 in a resumed run: tell them the real epoch.
    batches.set_epoch(state.epoch)
    losses: list[float] = []
    for batch in batches:
        result, logit_scale = _micro_batch(run, batch)
        losses.append(float(result.loss.detach()))
        state.samples += result.pairs  # the global batch
        if not accelerator.sync_gradients:
            continue
        _record_step(run, result, logit_scale, sum(losses) / len(losses))
        losses = []
        stop_reason = _checkpoint_or_stop(run)
        if stop_reason:
            return stop_reason
    return None


def _micro_batch(run: Run, batch: dict[str, Any]) -> tuple[LossOutput, torch.Tensor]:
    """Forward and backward of one micro-batch; the optimizer steps when accumulation is complete."""
    state, args, accelerator = run.state, run.args, run.accelerator
    state.batches_done += 1
    for index, reason in batch.get("bad", {}).items():
        state.bad[run.train_pairs.paths[int(index)]] = reason
    # Dropout noise as a function of (seed, epoch, batch, process), never of what ran before.
    torch.manual_seed(
        ((args.seed * 1_000_003 + state.epoch) * 1_000_003 + state.batches_done) * 1024
        + accelerator.process_index
    )
    with accelerator.accumulate(run.module):
        images, texts, logit_scale, logit_bias = run.module(batch)
        result = LOSSES[args.loss](
            images,
            texts,
            logit_scale,
            logit_bias,
            margin=args.margin,
            owner=batch.get("owner"),
            ids=batch["index"],
            queue=run.queue.negatives(),
            **(
                {"soft_targets": args.soft_targets, "soft_temperature": args.soft_temperature}
                if args.soft_targets
                else {}
            ),
        )
        accelerator.backward(result.backward_loss)
        run.queue.push(result.batch)
        if accelerator.sync_gradients:
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.trainable, args.max_grad_norm)
            set_lr(run.optimizer.param_groups, lr_factor(state.step, run.total_steps, run.warmup))
        run.optimizer.step()
        run.optimizer.zero_grad()
    return result, logit_scale


def _record_step(run: Run, result: LossOutput, logit_scale: torch.Tensor, loss: float) -> None:
    """After an optimizer step: clamp the temperature, count the step, add its row to the curves."""
    state = run.state
    with torch.no_grad():
        run.model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
    run.average.update(run.model)
    state.step += 1
    row = {
        "step": state.step,
        "epoch": state.epoch + state.batches_done / len(run.loader),
        "loss": loss,
        "lr": run.optimizer.param_groups[0]["lr"],
        "logit_scale": float(logit_scale.detach()),
        "negatives": result.negatives,
        "accuracy": result.accuracy,
    }
    state.history.append(row)
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{row['loss']:.3f}")
    if run.tracker:
        run.accelerator.log({"loss": row["loss"], "lr": row["lr"]}, step=state.step)


def _checkpoint_or_stop(run: Run) -> str | None:
    """Save every ``--checkpoint-every`` steps; the reason to stop once ``--max-steps`` is reached."""
    state, args = run.state, run.args
    if args.checkpoint_every and state.step % args.checkpoint_every == 0:
        state.add_time(run.began)
        run.began = now()
        _save(run)
    if args.max_steps and state.step >= args.max_steps:
        return f"reached --max-steps {args.max_steps}"
    return None


def _save(run: Run) -> None:
    save_checkpoint(run.accelerator, run.state, run.out, run.args.keep_checkpoints)
    run.last_saved = run.state.step


def _end_epoch(run: Run) -> str | None:
    """Evaluate a finished epoch, keep the best weights; the reason to stop when ``--patience`` runs out."""
    state, args = run.state, run.args
    state.epoch += 1
    state.batches_done = 0
    state.add_time(run.began)
    with run.average.swapped(run.model):  # with --ema, the averaged weights are the ones judged and kept
        report = _measure(run)
        improved = report is not None and _score(report) > state.best
        if improved and args.keep_best:
            state.best_weights = snapshot(run.model)
    run.began = now()
    if report is None:
        return None
    _record_eval(run, report)
    if improved:
        state.best, state.stale = _score(report), 0
        return None
    state.stale += 1
    if args.patience and state.stale >= args.patience:
        return f"no better recall for {args.patience} evaluation(s)"
    return None


def _score(report: dict[str, Any]) -> float:
    """What early stopping and ``--keep-best`` compare: the mean of text→image R@1/5/10."""
    return sum(report["t2i"].values()) / len(report["t2i"])


def _measure(run: Run) -> dict[str, Any] | None:
    """Recall on the evaluation pairs (None without ``--eval-data``); leaves the module in training mode."""
    if run.eval_pairs is None:
        return None
    args, start, device = run.args, run.start, run.accelerator.device
    if start.cached:
        report = cached_recall(run.model, run.caches["eval"], start.starts, device, args.eval_batch_size)
    else:
        report = served_recall(
            run.model, start.image_processor, start.tokenizer, run.eval_pairs, device, args.eval_batch_size
        )
    run.module.train()
    return report


def _record_eval(run: Run, report: dict[str, Any]) -> None:
    state = run.state
    row = {"step": state.step, "epoch": state.epoch}
    row.update({f"{d}_{k}": v for d in ("t2i", "i2t") for k, v in report[d].items()})
    state.evals.append(row)
    run.note("recall " + " ".join(f"{k}={v}" for k, v in row.items()))
    if run.tracker:
        run.accelerator.log({k: v for k, v in row.items() if "@" in k}, step=state.step)


def _finish(run: Run, extra: dict[str, Any]) -> dict[str, Any]:
    """Best weights, WiSE-FT, final recall, then the output folder (main process only)."""
    args, state, accelerator, start = run.args, run.state, run.accelerator, run.start
    model = run.model
    if args.keep_best and state.best_weights:
        restore(model, state.best_weights)
    else:
        run.average.copy_to(model)  # without a best evaluation, the average of the last steps
    if args.wise_alpha is not None:
        interpolate(model, start.start_weights, args.wise_alpha)
    after = _measure(run)
    trainable, total = count_parameters(model)
    report = {
        **extra,
        "args": dataclasses.asdict(args),
        "trainable_blocks": args.blocks,
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
        "pooling": embedding.pooling_of(model),
        "trainable": trainable,
        "total": total,
    }
    if accelerator.is_main_process:
        save_output(model, start.image_processor, start.tokenizer, run.out)
        write_csv(run.out / "metrics.csv", state.history)
        write_csv(run.out / "eval.csv", state.evals)
        plot(run.out / "curves.png", state.history, state.evals)
        write_card(run.out / "README.md", report)
        (run.out / "train_report.json").write_text(json.dumps(report, indent=2, default=str))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


__all__ = ["LoopState", "TrainingError", "train"]
