"""Command-line arguments of ``train`` and ``evaluate``, declared once as typed dataclasses.

Flags, types, defaults and help come from the field metadata (see :mod:`vitrine.config`). A
``--config FILE.toml|json|yaml`` supplies values for any field (keys in ``snake_case`` or
``kebab-case``); flags given on the command line win over the file, and the file wins over the defaults.
``--config NAME`` (no such file) names a recipe of ``train_contrastive/recipes/`` (``default`` is the
defaults below, written out; the others are the candidates ``bench/finetune.py`` sweeps).

The defaults *are* the recipe: ``train --vision-model V --text-model T --train-data TR --eval-data EV
--output OUT`` fine-tunes the last six blocks of the vision tower and the last three of the text tower
plus new projections from a cache of the frozen layers' activations, which is what lets a two-core CPU do
it in about twenty minutes; every caption of an image is its positive at every step (``--positives all``).
The choices come from runs on Flickr8k, recorded in bench/RESULTS.md with their numbers: batch 128 beat 64
over the eight epochs (each caption is ranked against the batch's images, so a bigger batch is more
negatives for text→image; one-epoch probes with one caption per image had favoured 64, and 256 was slower
per example on a 2-core CPU); CLIP's starting temperature 0.07 beat 0.03; all captions as positives beat
one sampled caption; six trainable vision blocks beat three, and nine trailed six. The last vision block
runs for the CLS token only (:func:`.features.cls_only_block`) and steps run in bf16 autocast on CPUs with
native bf16. Half the patch tokens are dropped from each cached training image (``--patch-dropout``):
without it the training loss fell fast while recall flattened after five epochs; dropping patches varies
each image from epoch to epoch and halves the vision work, which pays for eight epochs (ten gave the same
recall). What is evaluated and saved is a moving average of the weights (``--ema``): it was ahead of the
raw weights on every seed compared, by a few tenths of a point, for one in-place update per step. With it,
recall stopped rising after five epochs while the training pictures were still being memorised; dropout
0.1 in the trainable vision blocks (``--vision-dropout``: DeiT ships with none, MiniLM's text blocks have
0.1) kept it rising to the last epoch and gained on every seed. Batches
of look-alike images, mean-pooled images, word-piece dropout, mirrored pictures, soft targets and more
patch dropout are flags and recipes, but none beat these defaults by more than seed noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vitrine.config import EncoderSettings, add_arguments, arg, from_namespace
from vitrine.errors import VitrineError

C = TypeVar("C")
LOGIT_SCALE_MAX = math.log(100.0)  # temperature never below 0.01, as in CLIP
# Trainable last blocks per tower by default. The image side gains most from adapting: DeiT-tiny's
# ImageNet features are the weaker tower for captions, so it gets twice the text tower's blocks (the
# text tower, all five captions per image, is already the larger share of each step's work).
DEFAULT_BLOCKS = {"vision": 6, "text": 3}


class ConfigError(VitrineError):
    """A ``--config`` file cannot be read or names an unknown setting."""


@dataclass(kw_only=True)
class TrainArgs:
    """Fine-tune a CLIP-family model (or a dual encoder assembled from two pretrained towers) on
    image–caption pairs with a symmetric InfoNCE loss; write a save_pretrained folder that
    `python -m indexer build --model OUT` and the app load directly."""

    # -- what to start from ------------------------------------------------------------------------
    model: str | None = arg(None, "start from this CLIP-family / dual-encoder checkpoint (folder or hub id)")
    vision_model: str | None = arg(None, "or build a dual encoder: vision tower (e.g. a DeiT/ViT folder)")
    text_model: str | None = arg(None, "… and text tower (e.g. a sentence-transformers MiniLM folder)")
    projection_dim: int = arg(512, "embedding size of a dual encoder built from towers")
    temperature: float | None = arg(
        None,
        "initial temperature of a dual encoder built from towers (learnt, at least 0.01; "
        "default 0.07, or 0.1 with --loss siglip as SigLIP starts)",
    )
    vision_pooling: str = arg(
        "auto",
        "image embedding of a dual encoder built from towers: cls = the CLS token, mean = the mean of all "
        "tokens (saved in the config; serving pools the same way); auto = the tower's own choice (CLS for "
        "ViT/DeiT)",
        choices=["auto", "cls", "mean"],
    )
    # -- data --------------------------------------------------------------------------------------
    train_data: str = arg(
        help="captioned catalog to train on (folder with metadata, CSV/JSONL/Parquet, dataset)"
    )
    eval_data: str | None = arg(None, "captioned catalog for recall@k before, during and after training")
    image_column: str | None = arg(None, "manifest column with image paths (default: auto)")
    caption_column: str | None = arg(None, "manifest column with captions (default: auto)")
    augment: bool = arg(False, "random resized crop + flip on training images (disables the feature cache)")
    max_length: int = arg(64, "caption tokens kept (captions are short; longer costs time)")
    positives: str = arg(
        "all",
        "captions per training image and step: one = one sampled per epoch; all = every caption of the "
        "image as a multi-positive target (more text per step, same images)",
        choices=["one", "all"],
    )
    text_dropout: float = arg(
        0.0,
        "text augmentation: share of each training caption's word pieces masked out of attention and "
        "pooling (never its first and last token; works with the cache; evaluation sees all)",
    )
    num_workers: int = arg(2, "DataLoader processes decoding and preprocessing images")
    # -- output ------------------------------------------------------------------------------------
    output: str = arg(help="folder for the fine-tuned model, model card, curves and checkpoints")
    # -- what trains -------------------------------------------------------------------------------
    lock_vision: bool = arg(False, "freeze the whole vision tower (its projection still trains)")
    lock_text: bool = arg(False, "freeze the whole text tower (its projection still trains)")
    unfreeze_last_n: int | None = arg(
        None,
        "train only the last N transformer blocks of both towers (-1 = all layers); default: "
        f"{DEFAULT_BLOCKS['vision']} of the vision tower, {DEFAULT_BLOCKS['text']} of the text tower",
    )
    vision_blocks: int | None = arg(
        None,
        "trainable last blocks of the vision tower (-1 = all); wins over --unfreeze-last-n "
        f"(default: {DEFAULT_BLOCKS['vision']})",
    )
    text_blocks: int | None = arg(
        None,
        "trainable last blocks of the text tower (-1 = all); wins over --unfreeze-last-n "
        f"(default: {DEFAULT_BLOCKS['text']})",
    )
    cache: bool = arg(
        True, "compute frozen layers once per image/caption and reuse them every epoch (off with --augment)"
    )
    mirror: bool = arg(
        False,
        "also cache every training image flipped left to right and show each epoch the image or its "
        "mirror, a coin flip per image (augmentation that works with the cache; doubles the image cache)",
    )
    cache_dir: str | None = arg(None, "where the frozen-layer cache lives (default: OUTPUT/cache)")
    cache_dtype: str = arg("float16", "storage type of cached activations", choices=["float16", "float32"])
    vision_dropout: float = arg(
        0.1,
        "dropout after the attention and the MLP of each trainable vision block, against memorising a "
        "small training set (ViT/DeiT checkpoints ship with 0; CLIP's blocks have no such layer, so "
        "there it does nothing; the text tower keeps its own, 0.1 for BERT/MiniLM); 0 = off",
    )
    patch_dropout: float = arg(
        0.5,
        "share of image patch tokens left out of each training example's trainable vision blocks "
        "(the CLS token always stays; evaluation sees all); regularises and speeds up cached training",
    )
    # -- loss --------------------------------------------------------------------------------------
    loss: str = arg(
        "infonce",
        "infonce = CLIP's softmax over the global batch; siglip = SigLIP's pairwise sigmoid with a "
        "learnt bias; hardest = VSE++'s max-margin on each query's hardest negative (no temperature)",
        choices=["infonce", "siglip", "hardest"],
    )
    margin: float = arg(0.2, "margin of --loss hardest (cosine similarity units)")
    soft_targets: float = arg(
        0.0,
        "--loss infonce: share of each target spread over the batch by caption likeness, so pictures "
        "whose captions say the same count partly as right answers (false negatives); 0 = one-hot",
    )
    soft_temperature: float = arg(
        0.1,
        "temperature of --soft-targets' caption-likeness rows (higher spreads them wider; the model's "
        "own, about 0.05, would put nearly all of a row back on the positive)",
    )
    queue_size: int = arg(
        0,
        "extra negatives: rank each query also against the embeddings of the last N images and captions "
        "of earlier steps (a memory bank; entries of the query's own image are skipped); 0 = off. "
        "Experimental: with no momentum encoder it did not train on Flickr8k (docs/fine-tuning.md)",
    )
    # -- optimisation ------------------------------------------------------------------------------
    epochs: int = arg(
        8, "schedule length: passes over the training images (warmup + cosine span all of them)"
    )
    max_steps: int | None = arg(None, "stop after this many optimizer steps (default: run all epochs)")
    batch_size: int = arg(
        128, "pairs per process per step: every other pair of the global batch is a negative"
    )
    hard_batches: int = arg(
        0,
        "build each batch from groups of this many look-alike images (k-means of the start model's image "
        "features) so in-batch negatives are harder; 0 = random batches. Needs the frozen-layer cache",
    )
    grad_accum: int = arg(1, "micro-batches per optimizer step (negatives stay within a micro-batch)")
    lr: float = arg(3e-4, "peak learning rate of pretrained weights")
    vision_lr: float | None = arg(None, "peak learning rate of the vision tower's weights (default: --lr)")
    text_lr: float | None = arg(None, "peak learning rate of the text tower's weights (default: --lr)")
    layer_decay: float = arg(
        1.0,
        "layer-wise rate decay: each block below a tower's top block learns at this factor times the "
        "rate of the block above it (e.g. 0.75; 1 = one rate per tower)",
    )
    head_lr: float = arg(3e-3, "peak learning rate of the projections and the temperature")
    weight_decay: float = arg(0.05, "AdamW weight decay (never applied to norms, biases, temperature)")
    warmup_ratio: float = arg(0.05, "share of steps with linear warmup before the cosine decay")
    max_grad_norm: float = arg(1.0, "gradient clipping threshold (0 = off)")
    mixed_precision: str = arg(
        "auto",
        "auto = bf16 (or fp16) on GPUs that support it; bf16 on CPUs with native bf16, else none",
        choices=["auto", "no", "bf16", "fp16"],
    )
    seed: int = arg(0, "seed for initialisation, data order, caption sampling and augmentation")
    # -- evaluation, checkpoints ---------------------------------------------------------------------
    eval_batch_size: int = arg(256, "images or captions per forward when measuring recall")
    patience: int = arg(0, "stop after this many evaluations without a better text→image R@1 (0 = off)")
    keep_best: bool = arg(True, "end with the weights of the best evaluation, not the last")
    checkpoint_every: int = arg(200, "save the training state every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = arg(2, "how many training states to keep")
    resume: str | None = arg(None, "continue from a saved training state: a checkpoint folder or 'latest'")
    wise_alpha: float | None = arg(
        None,
        "WiSE-FT: keep alpha·fine-tuned + (1-alpha)·start weights (e.g. 0.5) to protect general retrieval",
    )
    ema: float = arg(
        0.99,
        "keep an exponential moving average of the trainable weights with this decay per step (0.99 "
        "spans about the last 100 steps once warmed up) and evaluate and save it instead of the raw "
        "weights; 0 = off. "
        "The warm-up min(D, (1+t)/(10+t)) stays below 0.99 until step 890, so on shorter runs every "
        "D >= 0.99 gives the same average",
    )
    progress: bool = arg(True, "progress bars on stderr")

    def validate(self) -> None:
        """Raise ``ValueError`` for combinations that cannot work, before any model is loaded."""
        if bool(self.vision_model) != bool(self.text_model):
            raise ValueError("--vision-model and --text-model go together")
        if not (self.model or self.vision_model):
            raise ValueError("give --model, or --vision-model and --text-model")
        if self.model and self.vision_model:
            raise ValueError("give either --model or --vision-model/--text-model, not both")
        if self.model and self.vision_pooling != "auto":
            raise ValueError(
                "--vision-pooling applies to a dual encoder built from --vision-model/--text-model"
            )
        if self.wise_alpha is not None and not 0.0 <= self.wise_alpha <= 1.0:
            raise ValueError("--wise-alpha must be within [0, 1]")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError("--ema must be within [0, 1)")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError("--layer-decay must be within (0, 1]")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError("--patch-dropout must be within [0, 1)")
        if not 0.01 <= self.initial_temperature <= 1.0:
            raise ValueError("--temperature must be within [0.01, 1]")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be at least 2: a contrastive loss needs negatives")
        if self.epochs < 1 or self.grad_accum < 1:
            raise ValueError("--epochs and --grad-accum must be at least 1")
        if not 0.0 <= self.vision_dropout < 1.0:
            raise ValueError("--vision-dropout must be within [0, 1)")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError("--text-dropout must be within [0, 1)")
        if self.hard_batches < 0 or self.hard_batches == 1:
            raise ValueError("--hard-batches must be 0 (off) or a group of at least 2 images")
        if self.queue_size < 0:
            raise ValueError("--queue-size must not be negative")
        if not 0.0 <= self.soft_targets < 1.0:
            raise ValueError("--soft-targets must be within [0, 1)")
        if self.soft_temperature <= 0:
            raise ValueError("--soft-temperature must be positive")
        if self.soft_targets and (self.loss != "infonce" or self.queue_size):
            raise ValueError("--soft-targets needs --loss infonce and no --queue-size")
        if any(rate is not None and rate < 0 for rate in (self.vision_lr, self.text_lr)):
            raise ValueError("--vision-lr and --text-lr must not be negative")
        if not 0.0 < self.margin <= 2.0:
            raise ValueError("--margin must be within (0, 2]: cosine similarities differ by at most 2")

    @property
    def blocks(self) -> dict[str, int]:
        """Trainable last blocks per tower: ``--vision-blocks``/``--text-blocks``, else
        ``--unfreeze-last-n``, else :data:`DEFAULT_BLOCKS`."""
        given = {"vision": self.vision_blocks, "text": self.text_blocks}
        both = self.unfreeze_last_n
        return {
            side: n if n is not None else both if both is not None else DEFAULT_BLOCKS[side]
            for side, n in given.items()
        }

    @property
    def tower_lr(self) -> dict[str, float]:
        """Peak learning rate of each tower's pretrained weights."""
        return {
            "vision": self.lr if self.vision_lr is None else self.vision_lr,
            "text": self.lr if self.text_lr is None else self.text_lr,
        }

    @property
    def initial_temperature(self) -> float:
        """``--temperature``, or the loss's usual start: 0.1 for SigLIP (t' = ln 10), CLIP's 0.07 else."""
        if self.temperature is not None:
            return self.temperature
        return 0.1 if self.loss == "siglip" else 0.07


@dataclass(kw_only=True)
class EvaluateArgs(EncoderSettings):
    """Text→image and image→text recall@1/5/10 of a model on a captioned catalog (each caption ranks all
    images; each image ranks all captions, a hit when any of its own captions is in the top k)."""

    data: str = arg(help="captioned catalog (folder with metadata, CSV/TSV/JSONL/Parquet manifest, dataset)")
    image_column: str | None = arg(None, "manifest column with image paths (default: auto)")
    caption_column: str | None = arg(None, "manifest column with captions (default: auto)")
    slice: str | None = arg(
        None,
        "also report recall per value of this metadata field (a manifest column), with counts and 95%% "
        "Wilson intervals",
    )
    json: bool = arg(False, "print the metrics as JSON")


RECIPES = Path(__file__).resolve().parent / "recipes"


def recipe_names() -> list[str]:
    """The named recipes ``--config NAME`` accepts."""
    return sorted(p.stem for p in RECIPES.glob("*.toml"))


def resolve_config(path: str) -> Path:
    """``path`` itself when it is a file, else the recipe of that name; ConfigError when neither."""
    file = Path(path)
    if file.exists() or "/" in path or file.suffix:
        return file
    recipe = RECIPES / f"{path}.toml"
    if not recipe.is_file():
        raise ConfigError(f"no config file or recipe named {path!r}; recipes: {', '.join(recipe_names())}")
    return recipe


def _parse_text(file: Path, text: str) -> Any:
    suffix = file.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
            import tomli as tomllib

        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def load_config(path: str) -> dict[str, Any]:
    """Settings from a TOML, JSON or YAML file, or a named recipe (a mapping of field names to values)."""
    file = resolve_config(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    import yaml

    try:
        data = _parse_text(file, text)
    except (ValueError, yaml.YAMLError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot parse config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse(cls: type[C], argv: Sequence[str] | None, prog: str) -> C:
    """Parse ``argv`` into ``cls``, taking defaults from ``--config FILE`` when given."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    parser.add_argument(
        "--config",
        help="TOML, JSON or YAML file of settings, or the name of a recipe in train_contrastive/recipes/ "
        f"({', '.join(recipe_names())}); flags win over it",
    )
    add_arguments(parser, cls)
    if known.config:
        values = load_config(known.config)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) in {known.config}: {', '.join(unknown)}")
        for action in parser._actions:  # a value from the file satisfies a required flag
            if action.dest in values:
                action.default = values[action.dest]
                action.required = False
    return from_namespace(cls, parser.parse_args(rest))
