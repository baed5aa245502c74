"""The frozen-layer feature cache: run the frozen bottom of each tower once, train the top from disk.

When only the last N blocks of a tower train, everything below them is a fixed function of the input.
Computing it once per image and per caption (in inference mode) and replaying only the top blocks every
epoch turns an hours-long CPU fine-tune into minutes: for DeiT-tiny with three trainable blocks of twelve
(the last one for the CLS token only, see :func:`cls_only_block`), an epoch costs about a fifth of a full
forward and backward.

The replayed top must give *exactly* the vector :mod:`vitrine.model.embedding` gives on the full model, or the
model would be trained on one embedding and served with another. So:

- the cut is taken with a forward pre-hook on the first trainable block of the model's own forward (the
  activation captured is literally what that block received), and
- the replay runs those same block modules, then the tower's own final norm, then
  ``embedding.pool`` (the very pooling serving uses) and the projection.

Replay is implemented for the tower families whose forward is "embeddings → blocks → final norm":
ViT/DeiT vision towers and BERT-style text towers (BERT, RoBERTa, MiniLM, the sentence-transformers
models built on them). Other models (CLIP, SigLIP) train through their full forward with the frozen
layers simply not updated. A test checks replay against ``embedding.image_features``/``text_features``.

Caption lengths vary, so text activations are stored flat (``(sum of lengths, hidden)``) with offsets
and padded per batch; padded positions are masked in attention and pooling, so their value is moot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vitrine.model import embedding

VISION_REPLAY = ("vit", "deit")
TEXT_REPLAY = ("bert", "roberta", "xlm-roberta")


def tower_of(model: nn.Module, side: str) -> nn.Module:
    """The vision or text tower of a CLIP-family model (``side`` is ``vision`` or ``text``)."""
    return getattr(model, f"{side}_model")


def blocks_of(tower: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a tower, wherever its architecture keeps it."""
    for path in ("layers", "encoder.layer", "encoder.layers"):
        module: Any = tower
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(tower).__name__}")


def replayable(model: nn.Module) -> bool:
    """Whether both towers can be resumed from a cached activation (see the module docstring)."""
    if embedding.model_kind(model) != "dual":
        return False
    vision = getattr(tower_of(model, "vision").config, "model_type", "")
    text = getattr(tower_of(model, "text").config, "model_type", "")
    return vision in VISION_REPLAY and text in TEXT_REPLAY and not tower_of(model, "text").config.is_decoder


class _Captured(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _capture(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """Run the model and return the first positional input ``module`` receives, stopping right there."""

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args[0] if args else kwargs["hidden_states"])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Captured as captured:
        return captured.value
    finally:
        handle.remove()
    raise RuntimeError(f"{type(module).__name__} was never called")  # pragma: no cover


def _entry_of(model: nn.Module, side: str, start: int) -> nn.Module | None:
    """The module whose input is cached: the first trainable block, else the final norm (if any)."""
    tower = tower_of(model, side)
    blocks = blocks_of(tower)
    if start < len(blocks):
        return blocks[start]
    return getattr(tower, "layernorm", None) if side == "vision" else None


@torch.inference_mode()
def frozen_image_states(model: nn.Module, pixel_values: torch.Tensor, start: int) -> torch.Tensor:
    """Activations entering vision block ``start`` (``(batch, tokens, hidden)``)."""
    tower = tower_of(model, "vision")
    entry = _entry_of(model, "vision", start)
    if entry is None:
        return tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
    return _capture(entry, lambda: tower(pixel_values=pixel_values, return_dict=True))


@torch.inference_mode()
def frozen_text_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Activations entering text block ``start`` (``(batch, tokens, hidden)``)."""
    tower = tower_of(model, "text")
    entry = _entry_of(model, "text", start)

    def run() -> Any:
        return tower(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)

    return run().last_hidden_state if entry is None else _capture(entry, run)


def _vit_block_parts(block: nn.Module) -> tuple[nn.Module, ...] | None:
    """``(layernorm_before, attention, layernorm_after, mlp, dropout)`` of a ViT/DeiT block, if it is one."""
    names = ("layernorm_before", "attention", "layernorm_after", "mlp", "dropout")
    parts = tuple(getattr(block, name, None) for name in names)
    attention = parts[1]
    if any(part is None for part in parts) or not all(
        hasattr(attention, name)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "num_attention_heads")
    ):
        return None
    return parts


def cls_only_block(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """The CLS row of ``block(hidden)`` for a ViT/DeiT block, computed for that row alone.

    The pooled vision embedding is the CLS token after the *last* block, and in that block only
    attention mixes tokens: the first norm, keys and values are needed for every token, but the query,
    the attention output projection, the second norm and the MLP only for CLS. For DeiT-tiny that
    skips about 85 % of the last block's work (forward and backward, in training and in evaluation)
    with the same result up to float rounding. Returns ``(batch, 1, hidden)``, or None for a block
    of another layout.
    """
    parts = _vit_block_parts(block)
    if parts is None:
        return None
    norm_before, attention, norm_after, mlp, dropout = parts
    batch, tokens, _ = hidden.shape
    normed = norm_before(hidden)
    heads = attention.num_attention_heads
    head_dim = attention.k_proj.out_features // heads
    query = attention.q_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(batch, tokens, heads, head_dim).transpose(1, 2)
    value = attention.v_proj(normed).view(batch, tokens, heads, head_dim).transpose(1, 2)
    drop = attention.attention_dropout if attention.training else 0.0
    mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=drop, scale=attention.scaling)
    cls = dropout(attention.o_proj(mixed.transpose(1, 2).reshape(batch, 1, heads * head_dim)))
    cls = cls + hidden[:, :1]
    return cls + dropout(mlp(norm_after(cls)))


def replay_image_features(model: nn.Module, states: torch.Tensor, start: int) -> torch.Tensor:
    """Projected image embeddings from cached activations: :func:`replay_image_pooled`, then the
    projection."""
    return model.visual_projection(replay_image_pooled(model, states, start))


def replay_image_pooled(model: nn.Module, states: torch.Tensor, start: int) -> torch.Tensor:
    """Pooled image features from cached activations: top blocks → final norm → pooling.

    With CLS pooling the last block runs for the CLS token only (:func:`cls_only_block`); the final
    norm acts per token, so normalising that one row is the same as normalising all and taking row 0.
    """
    tower = tower_of(model, "vision")
    how = embedding.pooling_of(model)["vision"]
    hidden = states
    blocks = list(blocks_of(tower)[start:])
    for block in blocks[:-1]:
        hidden = block(hidden, None)
    if blocks:
        last = cls_only_block(blocks[-1], hidden) if how == "cls" else None
        hidden = last if last is not None else blocks[-1](hidden, None)
    norm = getattr(tower, "layernorm", None)
    sequence = norm(hidden) if norm is not None else hidden
    pooled = (
        tower.pooler(sequence) if how == "pooler" and getattr(tower, "pooler", None) is not None else None
    )
    output = BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)
    return embedding.pool(output, how, None)


def replay_text_features(
    model: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Projected text embeddings from cached activations, pooled as :func:`embedding.text_features` pools."""
    from transformers.masking_utils import create_bidirectional_mask

    tower = tower_of(model, "text")
    hidden = states
    blocks = blocks_of(tower)[start:]
    if len(blocks):
        mask = create_bidirectional_mask(
            config=tower.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for block in blocks:
            hidden = block(hidden, mask)
    how = embedding.pooling_of(model)["text"]
    pooled = tower.pooler(hidden) if how == "pooler" and getattr(tower, "pooler", None) is not None else None
    output = BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
    return model.text_projection(embedding.pool(output, how, attention_mask))


def replay_cached_images(
    replay: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
    model: nn.Module,
    cache: FeatureCache,
    indices: list[int],
    start: int,
    batch_size: int,
) -> torch.Tensor:
    """``replay`` (:func:`replay_image_features` or :func:`replay_image_pooled`) over the cached images
    ``indices``, ``batch_size`` at a time on the model's device; float32 rows on the CPU."""
    device = next(model.parameters()).device
    parts = []
    for chunk in batched(indices, batch_size):
        states = cache.images[cache.image_row[chunk]].to(device, torch.float32)
        parts.append(replay(model, states, start).float().cpu())
    return torch.cat(parts)


@dataclass
class TextStates:
    """Cached text activations of many captions, stored flat; ``offsets[j]:offsets[j+1]`` is caption j."""

    flat: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, ids: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(states, attention_mask)`` for the captions ``ids``, in float32."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        starts, ends = self.offsets[ids], self.offsets[ids + 1]
        lengths = ends - starts
        width = int(lengths.max())
        states = torch.zeros(len(ids), width, self.flat.shape[1], dtype=torch.float32)
        for row, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            states[row, : b - a] = self.flat[a:b]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return states, mask


@dataclass
class FeatureCache:
    """Frozen activations for one catalog: ``images[row]`` per decodable image, ``texts`` per caption.

    ``image_row[i]`` is image i's row in ``images`` (-1 when it failed to decode: it is then left out
    of training and evaluation, and its reason kept in ``failures``). ``caption_offsets[i]`` gives the
    first caption of image i in ``texts``. ``mirrored`` (``--mirror``, training caches only) holds the
    same rows for each image flipped left to right.
    """

    images: torch.Tensor
    image_row: torch.Tensor
    texts: TextStates
    caption_offsets: torch.Tensor
    failures: dict[str, str]
    key: str = ""
    mirrored: torch.Tensor | None = None

    def to_state(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "image_row": self.image_row,
            "text_flat": self.texts.flat,
            "text_offsets": self.texts.offsets,
            "caption_offsets": self.caption_offsets,
            "failures": self.failures,
            "key": self.key,
            "mirrored": self.mirrored,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureCache:
        return cls(
            images=state["images"],
            image_row=state["image_row"],
            texts=TextStates(state["text_flat"], state["text_offsets"]),
            caption_offsets=state["caption_offsets"],
            failures=state["failures"],
            key=state["key"],
            mirrored=state.get("mirrored"),
        )

    def usable(self) -> list[int]:
        """Indices of images that decoded (the ones training and evaluation may use)."""
        return [i for i, row in enumerate(self.image_row.tolist()) if row >= 0]


def batched(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
