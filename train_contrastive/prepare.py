"""Everything a run builds before its first step, in the order :func:`train_contrastive.loop.train` calls
it: the accelerator (precision, accumulation, tracker), the start model with its frozen layers, the
frozen-layer cache when it applies (:mod:`.cache`), the batches, the optimizer. Each function takes the
pieces it needs and returns what it built.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from train_contrastive.args import TrainArgs
from train_contrastive.cache import CachedCollator, CachedPairs, build_cache, cache_key, load_or_build
from train_contrastive.data import EpochSampler, ImageCaptionDataset, PairCollator, Pairs
from train_contrastive.features import FeatureCache, replayable
from train_contrastive.freezing import apply_freezing
from train_contrastive.hard_batches import grouped_sampler
from train_contrastive.model import ContrastiveModule, load_start, set_block_dropout
from train_contrastive.optim import param_groups
from train_contrastive.state import TrainingError
from train_contrastive.wise import snapshot
from vitrine.model import embedding


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
    from vitrine.model.encoder import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "no"


def make_accelerator(args: TrainArgs, out: Path) -> tuple[Any, str | None]:
    """The ``accelerate`` Accelerator for this run, and the tracker it logs to (tensorboard if installed)."""
    from accelerate import Accelerator

    tracker = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = Accelerator(
        mixed_precision=resolve_precision(args.mixed_precision),
        gradient_accumulation_steps=args.grad_accum,
        log_with=tracker,
        project_dir=str(out / "runs"),
    )
    return accelerator, tracker


@dataclass
class StartModel:
    """The model training starts from, frozen as asked, with its processors."""

    model: Any
    image_processor: Any
    tokenizer: Any
    new_heads: bool
    starts: dict[str, int]  # per tower, the first trainable block
    kind: str
    start_weights: dict[str, torch.Tensor]  # for WiSE-FT; empty without --wise-alpha
    cached: bool  # whether the frozen layers run once, into the cache, instead of every step

    def text_limit(self, max_length: int) -> int:
        return embedding.text_limit(self.model, self.tokenizer, max_length)


def load_model(args: TrainArgs, device: Any) -> StartModel:
    model, image_processor, tokenizer, new_heads = load_start(
        args.model,
        args.vision_model,
        args.text_model,
        args.projection_dim,
        args.initial_temperature,
        args.vision_pooling,
    )
    starts = apply_freezing(
        model, lock_vision=args.lock_vision, lock_text=args.lock_text, unfreeze_last_n=args.blocks
    )
    start_weights = snapshot(model) if args.wise_alpha is not None else {}
    kind = embedding.model_kind(model)
    cached = (
        args.cache and not args.augment and replayable(model) and (starts["vision"] > 0 or starts["text"] > 0)
    )
    model.to(device)
    return StartModel(model, image_processor, tokenizer, new_heads, starts, kind, start_weights, cached)


def build_caches(
    args: TrainArgs, start: StartModel, accelerator: Any, named_pairs: dict[str, Pairs | None]
) -> dict[str, FeatureCache]:
    """The frozen layers' outputs for each set of pairs, loaded when an identical cache exists."""
    from tqdm import tqdm

    identity = {
        "start": args.model
        or [str(Path(args.vision_model or "").resolve()), str(Path(args.text_model or "").resolve())],
        "starts": start.starts,
        "dtype": args.cache_dtype,
        "max_length": args.max_length,
    }
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.output) / "cache"
    caches: dict[str, FeatureCache] = {}
    with accelerator.main_process_first():
        for name, pairs in named_pairs.items():
            if pairs is None:
                continue
            mirror = args.mirror and name == "train"  # evaluation sees the pictures as they are
            key = cache_key(
                {**identity, "mirror": True} if mirror else identity, pairs, start.image_processor
            )
            bar = tqdm(
                total=len(pairs) + pairs.n_captions,
                desc=f"caching frozen layers ({name})",
                disable=not (args.progress and accelerator.is_main_process),
                file=sys.stderr,
            )
            build = partial(
                build_cache,
                start.model,
                pairs,
                start.image_processor,
                start.tokenizer,
                start.starts,
                batch_size=args.eval_batch_size,
                num_workers=args.num_workers,
                limit=start.text_limit(args.max_length),
                dtype=getattr(torch, args.cache_dtype),
                device=accelerator.device,
                progress=bar.update,
                mirror=mirror,
            )
            caches[name] = load_or_build(cache_dir / f"{name}-{key}.pt", build)
            bar.close()
    return caches


@dataclass
class Batches:
    """The training batches: which pairs are used, the loader, and what draws per-epoch randomness."""

    usable: list[int]
    loader: DataLoader
    sampler: EpochSampler
    augmenter: Any  # the cached collator or the image dataset: both take ``set_epoch``


def make_batches(
    args: TrainArgs, start: StartModel, caches: dict[str, FeatureCache], pairs: Pairs, world: int
) -> Batches:
    """Batches of pairs: from the frozen-layer cache when it applies, else decoded images."""
    if args.mirror and not start.cached:
        raise TrainingError(
            "--mirror needs the frozen-layer cache (without it, --augment flips and crops every epoch)"
        )
    if start.cached:
        usable = caches["train"].usable()
        collator: Any = CachedCollator(caches["train"], pairs, args.seed, positives=args.positives)
        dataset: Any = CachedPairs()
        workers = 0
    else:
        usable = list(range(len(pairs)))
        dataset = ImageCaptionDataset(
            pairs, start.image_processor, seed=args.seed, augment=args.augment, positives=args.positives
        )
        collator = PairCollator(start.tokenizer, start.kind, start.text_limit(args.max_length))
        workers = args.num_workers
    batch_size = min(args.batch_size, len(usable) // world)
    if batch_size < 2:
        raise TrainingError(f"{len(usable)} usable training pairs: too few for {world} process(es)")
    sampler = _sampler(args, start, caches, usable)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    return Batches(usable, loader, sampler, collator if start.cached else dataset)


def _sampler(
    args: TrainArgs, start: StartModel, caches: dict[str, FeatureCache], usable: list[int]
) -> EpochSampler:
    """Random batches, or with ``--hard-batches`` batches of look-alike groups (:mod:`.hard_batches`)."""
    if not args.hard_batches:
        return EpochSampler(usable, args.seed)
    if not start.cached:
        raise TrainingError(
            "--hard-batches needs the frozen-layer cache: not with --augment, --no-cache, or a model "
            "whose towers cannot be replayed from it (CLIP, SigLIP)"
        )
    return grouped_sampler(start.model, caches["train"], usable, start.starts["vision"], args)


def make_module(args: TrainArgs, start: StartModel) -> ContrastiveModule:
    """The model wrapped for training: cached or full forward, patch dropout on cached image features,
    text dropout on captions, dropout in the trainable vision blocks, SigLIP's learnt bias with
    ``--loss siglip``. VSE++'s loss has no temperature, so with ``--loss hardest`` the model's is frozen
    (DDP refuses parameters that never get a gradient)."""
    if args.loss == "hardest":
        start.model.logit_scale.requires_grad_(False)
    set_block_dropout(start.model, "vision", start.starts["vision"], args.vision_dropout)
    return ContrastiveModule(
        start.model,
        start.starts,
        start.cached,
        args.patch_dropout if start.cached else 0.0,
        learnt_bias=args.loss == "siglip",
        text_dropout=args.text_dropout,
    )


def make_optimizer(args: TrainArgs, start: StartModel, module: ContrastiveModule) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: heads at ``--head-lr``, towers at ``--lr`` (or their own),
    no weight decay on 1-d parameters. The loss's bias, when there is one, is a head."""
    groups = param_groups(
        start.model,
        lr=args.lr,
        tower_lr=args.tower_lr,
        layer_decay=args.layer_decay,
        head_lr=args.head_lr,
        weight_decay=args.weight_decay,
        new_heads=start.new_heads,
    )
    if module.logit_bias is not None:
        bias = {"lr": args.head_lr, "initial_lr": args.head_lr, "weight_decay": 0.0}
        groups.append({"params": [module.logit_bias], **bias})
    return torch.optim.AdamW(groups)
