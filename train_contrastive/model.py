"""The model being trained: loading the start, the training forward, saving the result.

:class:`ContrastiveModule` is the one ``nn.Module`` handed to ``accelerator.prepare`` (so DDP sees a
single forward per step). Its forward returns projected, unnormalised image and text embeddings, the
log temperature and the loss's learnt bias (``--loss siglip`` only, else None), either through
:mod:`vitrine.model.embedding` on pixels and tokens (the serving path) or by replaying the top blocks on
cached frozen activations (:mod:`.features`), which gives the same vectors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train_contrastive.features import blocks_of, replay_image_features, replay_text_features, tower_of
from vitrine.errors import ModelLoadError
from vitrine.model import embedding


def load_start(
    model: str | None,
    vision_model: str | None,
    text_model: str | None,
    projection_dim: int,
    temperature: float = 0.07,
    vision_pooling: str = "auto",
) -> tuple[nn.Module, Any, Any, bool]:
    """``(model, image_processor, tokenizer, new_heads)``; ``new_heads`` when projections are new.

    ``temperature`` initialises the learnt temperature of a dual encoder built from towers; a CLIP-family
    checkpoint keeps its own. ``vision_pooling`` (``cls`` or ``mean``) overrides the pooling a dual
    encoder built from towers picks for its vision tower; it is saved in the config, so serving pools
    the same way.
    """
    if vision_model and text_model:
        try:
            built = embedding.build_dual_encoder(
                vision_model,
                text_model,
                projection_dim=projection_dim,
                logit_scale_init=math.log(1.0 / temperature),
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"cannot build a dual encoder from {vision_model} + {text_model}: {exc}"
            ) from exc
        if vision_pooling != "auto":
            pooling = {**embedding.pooling_of(built[0]), "vision": vision_pooling}
            setattr(built[0].config, embedding.POOLING_KEY, pooling)
        return (*built, True)
    from vitrine.model.encoder import load_components

    loaded = load_components(str(model))
    embedding.model_kind(loaded[0])  # refuse non-CLIP-family models before any training
    return (*loaded, False)


def set_block_dropout(model: nn.Module, side: str, start: int, share: float) -> int:
    """Set every ``nn.Dropout`` in the trainable blocks (``start`` on) of one tower to ``share``.

    Regularisation against memorising a small training set (``--vision-dropout``): transformers builds
    ViT/DeiT blocks with the checkpoint's ``hidden_dropout_prob``, 0 for DeiT, so unlike the text
    tower's 0.1 nothing is dropped there. Frozen blocks stay in eval mode whatever their ``p``; serving
    runs in eval mode, so the saved model is unchanged. Returns how many dropout modules were set: 0 for
    a locked tower or one whose blocks have none (CLIP's apply attention dropout only, from their config).
    """
    found = 0
    for block in blocks_of(tower_of(model, side))[start:]:
        for module in block.modules():
            if isinstance(module, nn.Dropout):
                module.p = share
                found += 1
    return found


def drop_patches(states: torch.Tensor, share: float) -> torch.Tensor:
    """Keep the CLS token and a random ``1 - share`` of the other tokens of each row (FLIP-style).

    Applied to cached activations entering the first trainable vision block: the frozen layers already
    mixed every patch in, so the trainable blocks still see the whole image through the tokens kept,
    while each example differs from epoch to epoch (the only image-side variation a cache allows) and
    those blocks do proportionally less work. Draws from the global RNG, which the loop reseeds per
    micro-batch, so ``--resume`` stays exact.
    """
    batch, tokens, width = states.shape
    keep = max(1, round((tokens - 1) * (1.0 - share)))
    chosen = torch.rand(batch, tokens - 1, device=states.device).argsort(dim=1)[:, :keep] + 1
    chosen = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=states.device), chosen], dim=1)
    return states.gather(1, chosen.unsqueeze(-1).expand(batch, keep + 1, width))


def drop_tokens(mask: torch.Tensor, share: float) -> torch.Tensor:
    """Text augmentation (``--text-dropout``): mask out a random ``share`` of each caption's tokens.

    The first and the last real token (a BERT tower's [CLS] and [SEP]) always stay; the others are
    removed from attention and from mean pooling by zeroing their attention-mask entries, which works
    the same on cached activations and on token ids -- word-dropout in the spirit of EDA's random
    deletion, cheap and label-preserving for short captions. Draws from the global RNG, which the loop
    reseeds per micro-batch, so ``--resume`` stays exact.
    """
    lengths = mask.sum(1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
    inner = (positions > 0) & (positions < lengths - 1) & mask.bool()
    dropped = inner & (torch.rand(mask.shape, device=mask.device) < share)
    return mask.masked_fill(dropped, 0)


SIGLIP_BIAS_INIT = -10.0  # SigLIP's start: nearly every pair of a batch is a negative


class ContrastiveModule(nn.Module):
    """Wraps a CLIP-family model for training; ``starts`` are the first trainable block per tower.

    ``logit_bias`` (SigLIP's learnt bias) lives here rather than in the model: retrieval ranks by cosine
    similarity, which a constant bias does not change, so the saved checkpoint stays a plain CLIP-family
    one; the training state (``--resume``) still holds it.
    """

    def __init__(
        self,
        model: nn.Module,
        starts: dict[str, int],
        cached: bool,
        patch_dropout: float = 0.0,
        learnt_bias: bool = False,
        text_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.text_dropout = text_dropout
        self.starts = starts
        self.cached = cached
        self.patch_dropout = patch_dropout
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_BIAS_INIT)) if learnt_bias else None

    def forward(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        m = self.model
        text_mask = batch["text_mask" if self.cached else "attention_mask"]
        if self.training and self.text_dropout > 0:
            text_mask = drop_tokens(text_mask, self.text_dropout)
        if self.cached:
            states = batch["image_states"]
            if self.training and self.patch_dropout > 0:
                states = drop_patches(states, self.patch_dropout)
            images = replay_image_features(m, states, self.starts["vision"])
            texts = replay_text_features(m, batch["text_states"], text_mask, self.starts["text"])
        else:
            images = embedding.image_features(m, batch["pixel_values"])
            texts = embedding.text_features(m, batch["input_ids"], text_mask)
        return images, texts, m.logit_scale, self.logit_bias

    def train(self, mode: bool = True) -> ContrastiveModule:
        """Frozen layers stay in eval mode (no dropout): they are a fixed function of the input."""
        super().train(mode)
        if mode:
            for side in ("vision", "text"):
                tower = tower_of(self.model, side)
                embeddings = getattr(tower, "embeddings", None)
                if embeddings is not None and self.starts[side] > 0:
                    embeddings.eval()
                for block in blocks_of(tower)[: self.starts[side]]:
                    block.eval()
        return self


def save_output(model: nn.Module, image_processor: Any, tokenizer: Any, out: Path) -> None:
    """``save_pretrained`` model + processor + tokenizer, loadable by ``Encoder.from_pretrained``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if embedding.model_kind(model) == "dual":
        from transformers import VisionTextDualEncoderProcessor

        VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
            out
        )
    else:
        image_processor.save_pretrained(out)
        tokenizer.save_pretrained(out)
